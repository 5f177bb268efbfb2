-- Puts delayed events back on their type's schedule after Redis lost its data (see
-- src/bus/recovery.rs). A member is the encoded event exactly as publish.lua added it, so an event
-- already there is not added twice. Refused, like a publish, while Redis has no epoch.
-- KEYS[1]: the epoch; KEYS[2]: the type's delay zset; KEYS[3]: the set of delay zsets holding
-- events. ARGV: per event its due time (ms) and the encoded event.
if redis.call('EXISTS', KEYS[1]) == 0 then
  return redis.error_reply('NOEPOCH Redis lost its data and is not recovered yet')
end
for i = 1, #ARGV, 2 do
  redis.call('ZADD', KEYS[2], ARGV[i], ARGV[i + 1])
end
redis.call('SADD', KEYS[3], KEYS[2])
return redis.status_reply('OK')
