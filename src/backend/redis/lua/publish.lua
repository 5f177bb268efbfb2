-- Adds events of one publish lane (or one replay) to their streams, each at most once. A lane
-- adds its events in the order of its sequence numbers, so one key per lane, the highest
-- sequence number added (its high-water mark), says exactly what was added: a batch run again
-- after a failure or a crash adds only what is above it. An event due later (by the Redis
-- clock) goes into its type's delay zset instead (scored by its due time), and move_due.lua
-- moves it to the stream when it is due.
--
-- For the groups' checkpoints (see checkpoint.lua and src/bus/recovery.rs), each stream keeps, per
-- lane, its last entry (`{stream}:lh`, lane -> "<entry id> <event id>") and an index of blocks
-- (`{stream}:ix:{lane}`, a zset: block start ms -> "<entry id, padded> <event id>" of the
-- block's first entry, at most one block per ARGV[3] ms): the lane's entries at or after any stream
-- position are never before the block that starts last before it.
--
-- Nothing is added to a Redis without the epoch (one that lost its data and is not recovered
-- yet): a recovery first records the log's end (see src/bus/recovery.rs). A caller that names the
-- epoch it expects learns when Redis is another data set than the one it last added to
-- (EPOCHCHANGED, with the epoch), before anything is added.
-- KEYS[1]: the epoch; KEYS[2]: the lane's high-water mark; KEYS[3]: the set of delay zsets
-- holding events; then per event its stream and its type's delay zset.
-- ARGV[1]: the mark's TTL in seconds; ARGV[2]: the lane's name in the index; ARGV[3]: the
-- index's block length in ms; ARGV[4]: the epoch expected, or '' for any; then per event its
-- sequence number, due time (ms since the epoch, 0: now), event id and the encoded event.
-- Returns {the number of events added, the epoch}.
local epoch = redis.call('GET', KEYS[1])
if not epoch then
  return redis.error_reply('NOEPOCH Redis lost its data and is not recovered yet')
end
if ARGV[4] ~= '' and ARGV[4] ~= epoch then
  return redis.error_reply('EPOCHCHANGED ' .. epoch)
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lane, block_ms = ARGV[2], tonumber(ARGV[3])
local mark = tonumber(redis.call('GET', KEYS[2]) or '0')
local top = mark
local added = 0
-- Per stream touched: {first entry, its event id, last entry, its event id}, in order.
local touched, order = {}, {}
for i = 1, (#KEYS - 3) / 2 do
  local seq = tonumber(ARGV[4 * i + 1])
  if seq > mark then
    local due = tonumber(ARGV[4 * i + 2])
    local stream = KEYS[2 * i + 2]
    if due > now then
      redis.call('ZADD', KEYS[2 * i + 3], due, ARGV[4 * i + 4])
      redis.call('SADD', KEYS[3], KEYS[2 * i + 3])
    else
      local id = redis.call('XADD', stream, '*', 'e', ARGV[4 * i + 4])
      local s = touched[stream]
      if not s then
        s = {id, ARGV[4 * i + 3]}
        touched[stream] = s
        order[#order + 1] = stream
      end
      s[3], s[4] = id, ARGV[4 * i + 3]
    end
    added = added + 1
    if seq > top then
      top = seq
    end
  end
end
for _, stream in ipairs(order) do
  local s = touched[stream]
  redis.call('HSET', stream .. ':lh', lane, s[3] .. ' ' .. s[4])
  local ix = stream .. ':ix:' .. lane
  local ms, sq = string.match(s[1], '^(%d+)-(%d+)$')
  ms = tonumber(ms)
  local last = redis.call('ZREVRANGE', ix, 0, 0, 'WITHSCORES')
  if #last == 0 or ms - tonumber(last[2]) >= block_ms then
    -- Padded, so that blocks starting in the same ms sort in stream order.
    redis.call('ZADD', ix, ms, string.format('%013d-%012d %s', ms, tonumber(sq), s[2]))
  end
end
redis.call('SET', KEYS[2], top, 'EX', ARGV[1])
return {added, epoch}
