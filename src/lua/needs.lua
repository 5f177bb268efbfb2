-- For each group of one stream, the entry it needs first (the oldest pending one, or the first
-- it has not been given), and the last one it was given: the janitor turns their events into
-- log positions, the groups' checkpoints.
-- KEYS[1]: the stream. Returns {name, first needed event or false, last given event or false}
-- per group.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {}
end
local function event_of(entries)
  if entries and #entries > 0 then
    local fields = entries[1][2]
    for i = 1, #fields, 2 do
      if fields[i] == 'e' then
        return fields[i + 1]
      end
    end
  end
  return false
end
local out = {}
for _, g in ipairs(redis.call('XINFO', 'GROUPS', KEYS[1])) do
  local info = {}
  for i = 1, #g, 2 do
    info[g[i]] = g[i + 1]
  end
  local last = info['last-delivered-id']
  local needed = false
  if tonumber(info['pending']) > 0 then
    local summary = redis.call('XPENDING', KEYS[1], info['name'])
    needed = event_of(redis.call('XRANGE', KEYS[1], summary[2], summary[2]))
  end
  if not needed then
    needed = event_of(redis.call('XRANGE', KEYS[1], '(' .. last, '+', 'COUNT', 1))
  end
  local given = false
  if last ~= '0-0' then
    given = event_of(redis.call('XRANGE', KEYS[1], last, last))
  end
  out[#out + 1] = {info['name'], needed, given}
end
return out
