-- Reclaims deliveries of one lane of a (type, group) whose holder stopped answering (a daemon
-- that died): entries of the pending list that are not scheduled retries and are idle longer
-- than the lease of the daemon (consumer) that holds them, plus a margin. A daemon's lease is
-- what it recorded in the group's lease hash (the longest ack timeout of its subscriptions to
-- the group, see lease.lua); a holder without a record (a daemon from before leases were
-- recorded) gets the longest lease of the daemons live now, else the group's old stored ack
-- timeout, else the caller's default. Each reclaimed entry counts as a failed attempt (see
-- `fail` in lib.lua).
-- KEYS: stream, retry zset, attempts hash, dead-letter stream, lease hash, settings hash.
-- ARGV: group, consumer, default lease ms, cursor, count, backoff initial ms, factor, cap ms,
-- max_attempts, jitter, live window ms.
-- Returns {next cursor ('0-0' when the scan wrapped), reclaimed, dead-lettered, the shortest
-- recorded lease in ms or -1}.
local now = redis_now_ms()
local group, me = ARGV[1], ARGV[2]
local live_window = tonumber(ARGV[11])
local leases, live_max, shortest = {}, nil, nil
local raw = redis.call('HGETALL', KEYS[5])
for i = 1, #raw, 2 do
  local ack, _, beat = string.match(raw[i + 1], '^(%d+):(%d+):(%d+)')
  if ack then
    ack, beat = tonumber(ack), tonumber(beat)
    leases[raw[i]] = ack
    if now - beat <= live_window and (live_max == nil or ack > live_max) then
      live_max = ack
    end
    if shortest == nil or ack < shortest then
      shortest = ack
    end
  end
end
local fallback = live_max or tonumber(redis.call('HGET', KEYS[6], 'ack_timeout_ms') or '') or tonumber(ARGV[3])
local function margin(ms)
  return math.max(math.floor(ms / 10), 250)
end
local count = tonumber(ARGV[5])
local pending = redis.pcall('XPENDING', KEYS[1], group, ARGV[4], '+', count)
if pending.err then
  return pending
end
local reclaimed, dead = 0, 0
local last = nil
for _, e in ipairs(pending) do
  local id, holder, idle = e[1], e[2], tonumber(e[3])
  last = id
  local lease = leases[holder] or fallback
  local min_idle = lease + margin(lease)
  if idle >= min_idle and not redis.call('ZSCORE', KEYS[2], id) then
    local claimed = redis.call('XCLAIM', KEYS[1], group, me, min_idle, id)
    if #claimed > 0 then
      local res = fail(KEYS[1], KEYS[2], KEYS[3], KEYS[4], group, id, true, false,
        'lease expired: the daemon holding it stopped answering', -1,
        tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[10]), tonumber(ARGV[9]), now)
      reclaimed = reclaimed + 1
      dead = dead + res[1]
    elseif #redis.call('XRANGE', KEYS[1], id, id) == 0 then
      -- Trimmed while pending: XCLAIM dropped it from the pending list; forget its state.
      redis.call('HDEL', KEYS[3], id, id .. ':e', id .. ':h')
      redis.call('ZREM', KEYS[2], id)
    end
  end
end
local cursor = '0-0'
if last and #pending >= count then
  cursor = '(' .. last
end
return {cursor, reclaimed, dead, shortest or -1}
