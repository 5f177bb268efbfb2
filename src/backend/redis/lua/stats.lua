-- The state of the named groups of one stream, for `stats`.
-- KEYS[1]: the stream; KEYS[2..n+1]: each group's dead-letter stream. ARGV: the group names.
-- Returns per group {lag, pending, idle ms of the oldest pending entry, new dead letters}.
local info = groups_of(KEYS[1])
local out = {}
for i, name in ipairs(ARGV) do
  local m = info[name]
  local lag, pending, idle = 0, 0, 0
  if m then
    lag = tonumber(m['lag']) or 0
    pending = tonumber(m['pending']) or 0
    if pending > 0 then
      local oldest = redis.call('XPENDING', KEYS[1], name, '-', '+', 1)
      if #oldest > 0 then
        idle = tonumber(oldest[1][3]) or 0
      end
    end
  end
  out[#out + 1] = {lag, pending, idle, redis.call('XLEN', KEYS[i + 1])}
end
return out
