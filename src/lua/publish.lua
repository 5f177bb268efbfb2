-- Adds events of one publish lane to their streams, each at most once. A lane adds its events in
-- the order of its sequence numbers, so one key per lane, the highest sequence number added
-- (its high-water mark), says exactly what was added: a batch run again after a failure or a
-- crash adds only what is above it.
-- KEYS[1]: the lane's high-water mark; KEYS[2..n+1]: the stream of each event, in order.
-- ARGV[1]: the mark's TTL in seconds; ARGV[2..]: per event its sequence number, then the
-- encoded event.
-- Returns the number of entries added.
local mark = tonumber(redis.call('GET', KEYS[1]) or '0')
local top = mark
local added = 0
for i = 2, #KEYS do
  local seq = tonumber(ARGV[2 * i - 2])
  if seq > mark then
    redis.call('XADD', KEYS[i], '*', 'e', ARGV[2 * i - 1])
    added = added + 1
    if seq > top then
      top = seq
    end
  end
end
redis.call('SET', KEYS[1], top, 'EX', ARGV[1])
return added
