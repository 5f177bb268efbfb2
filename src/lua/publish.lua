-- Adds events of one publish lane to their streams, each at most once. A lane adds its events in
-- the order of its sequence numbers, so one key per lane, the highest sequence number added
-- (its high-water mark), says exactly what was added: a batch run again after a failure or a
-- crash adds only what is above it.
-- Nothing is added to a Redis without the epoch (one that lost its data and is not recovered
-- yet): the recovery first records what the lanes had added before the loss (see recovery.rs).
-- KEYS[1]: the epoch; KEYS[2]: the lane's high-water mark; KEYS[3..n+2]: the stream of each
-- event, in order. ARGV[1]: the mark's TTL in seconds; ARGV[2..]: per event its sequence
-- number, then the encoded event.
-- Returns the number of entries added.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NOEPOCH Redis lost its data and is not recovered yet')
end
local mark = tonumber(redis.call('GET', KEYS[2]) or '0')
local top = mark
local added = 0
for i = 3, #KEYS do
  local seq = tonumber(ARGV[2 * i - 4])
  if seq > mark then
    redis.call('XADD', KEYS[i], '*', 'e', ARGV[2 * i - 3])
    added = added + 1
    if seq > top then
      top = seq
    end
  end
end
redis.call('SET', KEYS[2], top, 'EX', ARGV[1])
return added
