-- The state of the named groups of one stream, for `stats`.
-- KEYS[1]: the stream; then per group its dead-letter stream and its retry schedule (zset).
-- ARGV: the group names.
-- Returns per group {lag, pending, idle ms of the oldest pending entry, new dead letters,
-- scheduled}: `scheduled` counts the entries in the retry schedule (a failed attempt waiting for
-- its backoff, or a delivery handed back); they stay in the pending list until retried, but
-- nobody holds them, so `pending` and the oldest pending entry leave them out.
local info = groups_of(KEYS[1])
local out = {}
for i, name in ipairs(ARGV) do
  local dead, retry = KEYS[2 * i], KEYS[2 * i + 1]
  local m = info[name]
  local lag, pending, idle = 0, 0, 0
  local scheduled = redis.call('ZCARD', retry)
  if m then
    lag = tonumber(m['lag']) or 0
    pending = math.max(0, (tonumber(m['pending']) or 0) - scheduled)
    if pending > 0 then
      -- The oldest entry held by a consumer: among the first 100 of the pending list, the
      -- first that is not waiting in the retry schedule.
      for _, e in ipairs(redis.call('XPENDING', KEYS[1], name, '-', '+', 100)) do
        if not redis.call('ZSCORE', retry, e[1]) then
          idle = tonumber(e[3]) or 0
          break
        end
      end
    end
  end
  out[#out + 1] = {lag, pending, idle, redis.call('XLEN', dead), scheduled}
end
return out
