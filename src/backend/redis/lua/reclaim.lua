-- Reclaims deliveries of one (type, group) whose holder stopped answering (a daemon that died):
-- entries idle in the pending list longer than the group's ack timeout that are not scheduled
-- retries. Each counts as a failed attempt (see `fail` in lib.lua).
-- KEYS: stream, retry zset, attempts hash, dead-letter stream.
-- ARGV: group, consumer, min idle ms, cursor, count, backoff initial ms, factor, cap ms,
-- max_attempts, jitter.
-- Returns {next cursor, reclaimed count, dead-lettered count}.
local now = redis_now_ms()
local r = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4], 'COUNT', ARGV[5], 'JUSTID')
local reclaimed, dead = 0, 0
for _, id in ipairs(r[2]) do
  if not redis.call('ZSCORE', KEYS[2], id) then
    local res = fail(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], id, true, false,
      'lease expired: the daemon holding it stopped answering', -1,
      tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[10]), tonumber(ARGV[9]), now)
    reclaimed = reclaimed + 1
    dead = dead + res[1]
  end
end
for _, id in ipairs(r[3] or {}) do
  redis.call('HDEL', KEYS[3], id, id .. ':e', id .. ':h')
  redis.call('ZREM', KEYS[2], id)
end
return {r[1], reclaimed, dead}
