-- Adds events of one publish lane to their streams, each at most once. A lane adds its events in
-- the order of its sequence numbers, so one key per lane, the highest sequence number added
-- (its high-water mark), says exactly what was added: a batch run again after a failure or a
-- crash adds only what is above it. A delayed event goes into its type's delay zset instead
-- (scored by its due time), and move_due.lua moves it to the stream when it is due.
-- Nothing is added to a Redis without the epoch (one that lost its data and is not recovered
-- yet): the recovery first records what the lanes had added before the loss (see recovery.rs).
-- KEYS[1]: the epoch; KEYS[2]: the lane's high-water mark; KEYS[3]: the set of delay zsets
-- holding events; then per event its stream and its type's delay zset.
-- ARGV[1]: the mark's TTL in seconds; then per event its sequence number, due time (ms since
-- the epoch, 0: now) and the encoded event.
-- Returns the number of events added.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NOEPOCH Redis lost its data and is not recovered yet')
end
local mark = tonumber(redis.call('GET', KEYS[2]) or '0')
local top = mark
local added = 0
for i = 1, (#KEYS - 3) / 2 do
  local seq = tonumber(ARGV[3 * i - 1])
  if seq > mark then
    local due = tonumber(ARGV[3 * i])
    if due > 0 then
      redis.call('ZADD', KEYS[2 * i + 3], due, ARGV[3 * i + 1])
      redis.call('SADD', KEYS[3], KEYS[2 * i + 3])
    else
      redis.call('XADD', KEYS[2 * i + 2], '*', 'e', ARGV[3 * i + 1])
    end
    added = added + 1
    if seq > top then
      top = seq
    end
  end
end
redis.call('SET', KEYS[2], top, 'EX', ARGV[1])
return added
