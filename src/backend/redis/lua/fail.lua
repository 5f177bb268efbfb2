-- Ends deliveries of one (type, group) that did not succeed (see `fail` in lib.lua).
-- KEYS: stream, retry zset, attempts hash, dead-letter stream.
-- ARGV[1]: group; ARGV[2..4]: backoff initial ms, factor, cap ms;
-- then per delivery 7 values: id, count (0/1), dead (0/1), error, delay ms (-1: backoff),
-- jitter in [0, 1), max_attempts.
-- Returns, per delivery, {dead (0/1), attempts, due ms (when scheduled)}, and last the Redis time.
local now = redis_now_ms()
local initial, factor, cap = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local out = {}
for i = 5, #ARGV, 7 do
  out[#out + 1] = fail(KEYS[1], KEYS[2], KEYS[3], KEYS[4], ARGV[1], ARGV[i], ARGV[i + 1] == '1', ARGV[i + 2] == '1',
    ARGV[i + 3], tonumber(ARGV[i + 4]), initial, factor, cap, tonumber(ARGV[i + 5]), tonumber(ARGV[i + 6]), now)
end
out[#out + 1] = now
return out
