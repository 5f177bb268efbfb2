-- Adds one publish batch to its streams, at most once per batch.
-- KEYS[1]: the batch key; KEYS[2..n+1]: the stream of each event, in log order.
-- ARGV[1]: the batch key's TTL in seconds; ARGV[2..n+1]: each encoded event.
-- Returns the number of entries added: 0 when this batch was added before.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
for i = 2, #KEYS do
  redis.call('XADD', KEYS[i], '*', 'e', ARGV[i])
end
return #KEYS - 1
