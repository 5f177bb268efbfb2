-- Moves a group's read position on its type's stream (XGROUP SETID), keeping its lag right
-- (ENTRIESREAD: the entries added before the position). Deliveries pending or scheduled for a
-- retry are not touched, nor is the replay lane.
-- KEYS[1]: the stream. ARGV: group, to ('end', 'start', or an entry id: read what comes after it).
-- Returns the entry id the group now reads after, or an error NOGROUP.
local stream, group, to = KEYS[1], ARGV[1], ARGV[2]
if redis.call('EXISTS', stream) == 0 then
  return redis.error_reply('NOGROUP the stream does not exist')
end
local info = {}
local raw = redis.call('XINFO', 'STREAM', stream)
for i = 1, #raw, 2 do
  info[raw[i]] = raw[i + 1]
end
local added = tonumber(info['entries-added']) or 0
local len = tonumber(info['length']) or 0
local id, read
if to == 'end' then
  id, read = info['last-generated-id'], added
elseif to == 'start' then
  id, read = '0-0', added - len
else
  -- Count what lies after the position, a page at a time.
  local after, cur = 0, '(' .. to
  while true do
    local page = redis.call('XRANGE', stream, cur, '+', 'COUNT', 10000)
    after = after + #page
    if #page < 10000 then
      break
    end
    cur = '(' .. page[#page][1]
  end
  id, read = to, added - after
end
local r = redis.pcall('XGROUP', 'SETID', stream, group, id, 'ENTRIESREAD', read)
if type(r) == 'table' and r.err then
  return r
end
return id
