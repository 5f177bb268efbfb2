-- Removes one (type, group) from Redis: its consumer group on the type's stream, its replay
-- lane (the stream, its consumer group, its lanes' heads and index), the retry schedules and
-- attempt state of both lanes, its dead-letter stream (copied into the log before), its
-- settings and its lease records. The type's stream and delay zset are shared by every group
-- and stay.
-- KEYS: stream, replay stream, retry, replay retry, attempts, replay attempts, dead letters,
-- settings, leases. ARGV: group.
-- Returns 1 when the group existed on the type's stream, else 0.
local existed = 0
if redis.call('EXISTS', KEYS[1]) == 1 then
  local n = redis.pcall('XGROUP', 'DESTROY', KEYS[1], ARGV[1])
  if type(n) == 'number' then
    existed = n
  end
end
local heads = KEYS[2] .. ':lh'
for _, lane in ipairs(redis.call('HKEYS', heads)) do
  redis.call('DEL', KEYS[2] .. ':ix:' .. lane)
end
redis.call('DEL', KEYS[2], heads, KEYS[3], KEYS[4], KEYS[5], KEYS[6], KEYS[7], KEYS[8], KEYS[9])
return existed
