-- Takes the retries of one (type, group) that are due, at most ARGV[3], and claims their stream
-- entries for this consumer, atomically: two daemons never take the same retry.
-- KEYS: retry zset, stream, attempts hash. ARGV: group, consumer, count.
-- Returns {now, next due score or -1, {id, fields, attempts}...}.
local now = redis_now_ms()
local out = {now, -1}
local ids = {}
if tonumber(ARGV[3]) > 0 then
  ids = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))
end
for _, id in ipairs(ids) do
  redis.call('ZREM', KEYS[1], id)
  local claimed = redis.call('XCLAIM', KEYS[2], ARGV[1], ARGV[2], 0, id)
  if #claimed > 0 and claimed[1] then
    out[#out + 1] = {claimed[1][1], claimed[1][2], redis.call('HGET', KEYS[3], id) or '0'}
  else
    -- Acknowledged meanwhile, or trimmed: nothing left to retry.
    redis.call('HDEL', KEYS[3], id, id .. ':e', id .. ':h')
  end
end
local next_due = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
if #next_due > 0 then
  out[2] = tonumber(next_due[2])
end
return out
