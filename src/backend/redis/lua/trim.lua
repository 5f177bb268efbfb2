-- Trims one stream below the lowest entry some group still needs, and removes consumers that
-- hold nothing and have been idle for long. The lanes' index of the stream (see publish.lua) is
-- trimmed with it: a lane none of whose entries any group still needs is forgotten, and of the
-- others' blocks, those before the block that holds the lowest needed entry go.
-- KEYS[1]: the stream. ARGV[1]: consumer idle ms after which an empty consumer is removed;
-- ARGV[2]: most entries to remove in this call (XTRIM is O(removed) and Redis runs nothing else
-- meanwhile, so a long stream is trimmed over several calls); ARGV[3..]: the groups the event
-- log knows for this type.
-- Returns the number of entries trimmed, or -1 when a known group is missing from Redis (Redis
-- lost state: nothing is trimmed until the groups are recovered).
if redis.call('EXISTS', KEYS[1]) == 0 then
  return 0
end
local groups = redis.call('XINFO', 'GROUPS', KEYS[1])
local present = {}
local function id_parts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function less(a, b)
  local am, as = id_parts(a)
  local bm, bs = id_parts(b)
  return am < bm or (am == bm and as < bs)
end
local min = nil
for _, g in ipairs(groups) do
  local info = {}
  for i = 1, #g, 2 do
    info[g[i]] = g[i + 1]
  end
  present[info['name']] = true
  local ms, seq = id_parts(info['last-delivered-id'])
  local need = string.format('%d-%d', ms, seq + 1)
  if tonumber(info['pending']) > 0 then
    local summary = redis.call('XPENDING', KEYS[1], info['name'])
    if summary[2] and less(summary[2], need) then
      need = summary[2]
    end
  end
  if min == nil or less(need, min) then
    min = need
  end
  local consumers = redis.call('XINFO', 'CONSUMERS', KEYS[1], info['name'])
  for _, c in ipairs(consumers) do
    local ci = {}
    for i = 1, #c, 2 do
      ci[c[i]] = c[i + 1]
    end
    if tonumber(ci['pending']) == 0 and tonumber(ci['idle']) > tonumber(ARGV[1]) then
      redis.call('XGROUP', 'DELCONSUMER', KEYS[1], info['name'], ci['name'])
    end
  end
end
for i = 3, #ARGV do
  if not present[ARGV[i]] then
    return -1
  end
end
local lh = redis.call('HGETALL', KEYS[1] .. ':lh')
for i = 1, #lh, 2 do
  local ix = KEYS[1] .. ':ix:' .. lh[i]
  local last = string.match(lh[i + 1], '^(%S+) ')
  if min == nil or less(last, min) then
    redis.call('HDEL', KEYS[1] .. ':lh', lh[i])
    redis.call('DEL', ix)
  else
    local min_ms = id_parts(min)
    local keep = redis.call('ZREVRANGEBYSCORE', ix, min_ms - 1, '-inf', 'WITHSCORES', 'LIMIT', 0, 1)
    if #keep > 0 then
      redis.call('ZREMRANGEBYSCORE', ix, '-inf', '(' .. keep[2])
    end
  end
end
if min == nil then
  -- No group: nobody can receive these entries (a new group starts at the end).
  return redis.call('XTRIM', KEYS[1], 'MAXLEN', '~', 0, 'LIMIT', ARGV[2])
end
return redis.call('XTRIM', KEYS[1], 'MINID', '~', min, 'LIMIT', ARGV[2])
