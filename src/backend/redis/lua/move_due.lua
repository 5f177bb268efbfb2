-- Moves a type's delayed events that are due (by the Redis clock) into its stream, oldest
-- first, atomically, so two daemons never move one twice. The moves are indexed like a lane's
-- adds (see publish.lua) under the lane name `delay`, with due times instead of event ids:
-- events enter the stream in due order, so a group's checkpoint can say which due times it
-- has acknowledged (see checkpoint.lua).
-- KEYS[1]: the type's delay zset; KEYS[2]: its stream; KEYS[3]: the set of delay zsets holding
-- events. ARGV[1]: most events to move; ARGV[2]: the index's block length in ms.
-- Returns the number moved.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'WITHSCORES', 'LIMIT', 0, tonumber(ARGV[1]))
local first, first_due, last, last_due
for i = 1, #due, 2 do
  local id = redis.call('XADD', KEYS[2], '*', 'e', due[i])
  redis.call('ZREM', KEYS[1], due[i])
  if not first then
    first, first_due = id, due[i + 1]
  end
  last, last_due = id, due[i + 1]
end
if first then
  redis.call('HSET', KEYS[2] .. ':lh', 'delay', last .. ' ' .. last_due)
  local ix = KEYS[2] .. ':ix:delay'
  local ms, sq = string.match(first, '^(%d+)-(%d+)$')
  ms = tonumber(ms)
  local top = redis.call('ZREVRANGE', ix, 0, 0, 'WITHSCORES')
  if #top == 0 or ms - tonumber(top[2]) >= tonumber(ARGV[2]) then
    -- Padded as in publish.lua.
    redis.call('ZADD', ix, ms, string.format('%013d-%012d %s', ms, tonumber(sq), first_due))
  end
end
if redis.call('ZCARD', KEYS[1]) == 0 then
  redis.call('SREM', KEYS[3], KEYS[1])
end
return #due / 2
