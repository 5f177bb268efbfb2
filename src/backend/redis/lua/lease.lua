-- A daemon's lease on one (type, group): the longest ack timeout of its subscriptions to the
-- group, how many there are, and when it last said so (a heartbeat, Redis clock), as
-- `ack_ms:subs:beat_ms:token` in the group's lease hash under its consumer name. Reclaimers
-- wait that long (plus a margin) before they take a delivery it holds (reclaim.lua); a record
-- whose heartbeat is recent counts as live subscriptions (`groups`, `group_delete`). Setting
-- also marks the group active (`active` in its settings hash) and forgets records silent for
-- longer than the longest lease could need.
-- KEYS: lease hash, settings hash. ARGV: consumer, ack ms, subs, token, mode ('set' or 'drop'),
-- forget-after ms.
-- Drop removes the record only when it still carries `token` (a newer worker of the same
-- daemon may have written it since). Returns 1 (set: 0 when the group is gone).
local now = redis_now_ms()
if ARGV[5] == 'drop' then
  local cur = redis.call('HGET', KEYS[1], ARGV[1])
  if cur and string.match(cur, ':([^:]*)$') == ARGV[4] then
    redis.call('HDEL', KEYS[1], ARGV[1])
  end
  return 1
end
-- A group that was deleted (its settings hash, made with the group, is gone) gets no record:
-- a heartbeat that comes after a delete must not bring its keys back. Returns 0 then.
if redis.call('EXISTS', KEYS[2]) == 0 then
  return 0
end
local forget = tonumber(ARGV[6])
local raw = redis.call('HGETALL', KEYS[1])
for i = 1, #raw, 2 do
  local beat = tonumber(string.match(raw[i + 1], '^%d+:%d+:(%d+)') or '0')
  if now - beat > forget then
    redis.call('HDEL', KEYS[1], raw[i])
  end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ':' .. ARGV[3] .. ':' .. now .. ':' .. ARGV[4])
redis.call('PEXPIRE', KEYS[1], forget)
redis.call('HSET', KEYS[2], 'active', now)
return 1
