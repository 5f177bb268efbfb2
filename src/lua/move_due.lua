-- Moves a type's delayed events that are due (by the Redis clock) into its stream, oldest
-- first, atomically, so two daemons never move one twice.
-- KEYS[1]: the type's delay zset; KEYS[2]: its stream; KEYS[3]: the set of delay zsets holding
-- events. ARGV[1]: most events to move.
-- Returns the number moved.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[1]))
for _, e in ipairs(due) do
  redis.call('XADD', KEYS[2], '*', 'e', e)
  redis.call('ZREM', KEYS[1], e)
end
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[3], KEYS[1])
end
return #due
