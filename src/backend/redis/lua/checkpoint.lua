-- What the groups of one type have acknowledged, for their checkpoints (see src/bus/checkpoint.rs):
-- per group and per stream it reads (the type's stream and the group's replay stream), the
-- first position the group has not acknowledged, and per lane that adds to the stream a bound
-- on the lane's entries from that position on.
-- KEYS[1]: the type's stream; KEYS[2]: its delay zset; KEYS[3]: the epoch; then per group its
-- replay stream. ARGV: the group names, in the same order.
-- Returns {epoch or false, Redis time in ms, the earliest due time in the delay zset or -1,
-- then per group {name, live, replay}}. `live` and `replay` are false when the group is
-- missing there, else a list of {lane, kind, value}:
-- - kind `after`: the group acknowledged every entry of the lane; value: the last entry's event
--   id (or, for the lane `delay`, its due time);
-- - kind `at`: value: the event id (or due time) of the first entry of the lane's block that
--   starts last before the group's first unacknowledged position: no entry of the lane the
--   group has not acknowledged comes before it;
-- - kind `unknown`: the lane's index is missing (nothing can be bound).
local function parse(id)
  local ms, sq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(sq)
end

-- The first position the group has not acknowledged: its oldest pending entry, or right
-- after the last entry it was given.
local function need(stream, m, group)
  local ms, sq = parse(m['last-delivered-id'])
  sq = sq + 1
  if tonumber(m['pending']) > 0 then
    local summary = redis.call('XPENDING', stream, group)
    local pms, psq = parse(summary[2])
    if pms < ms or (pms == ms and psq < sq) then
      ms, sq = pms, psq
    end
  end
  return ms, sq
end

local function lanes(stream, n_ms, n_sq)
  local out = {}
  local lh = redis.call('HGETALL', stream .. ':lh')
  for i = 1, #lh, 2 do
    local lane = lh[i]
    local last, value = string.match(lh[i + 1], '^(%S+) (.*)$')
    local lms, lsq = parse(last)
    if lms < n_ms or (lms == n_ms and lsq < n_sq) then
      out[#out + 1] = {lane, 'after', value}
    else
      local ix = stream .. ':ix:' .. lane
      local b = redis.call('ZREVRANGEBYSCORE', ix, n_ms - 1, '-inf', 'LIMIT', 0, 1)
      if #b == 0 then
        b = redis.call('ZRANGE', ix, 0, 0)
      end
      if #b == 0 then
        out[#out + 1] = {lane, 'unknown', ''}
      else
        out[#out + 1] = {lane, 'at', string.match(b[1], '^%S+ (.*)$')}
      end
    end
  end
  return out
end

local function state(stream, info, group)
  local m = info[group]
  if not m then
    return false
  end
  local ms, sq = need(stream, m, group)
  return lanes(stream, ms, sq)
end

local t = redis.call('TIME')
local out = {redis.call('GET', KEYS[3]), tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000), -1}
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
if #first > 0 then
  out[3] = tonumber(first[2])
end
local live = groups_of(KEYS[1])
for i, group in ipairs(ARGV) do
  out[#out + 1] = {group, state(KEYS[1], live, group), state(KEYS[3 + i], groups_of(KEYS[3 + i]), group)}
end
return out
