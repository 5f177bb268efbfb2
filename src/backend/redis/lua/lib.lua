-- Shared by the scripts that need it; the Rust side prepends it to each of them.

local function redis_now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Ends one delivery that did not succeed.
-- count: the attempt failed (nack, expired lease, closed socket) rather than being released
-- (unsubscribe, shutdown). dead: straight to the dead-letter stream. delay < 0: use the backoff.
-- Returns {1, attempts} when the entry was dead-lettered, {0, attempts, due_ms} when it was
-- scheduled for another attempt.
-- An entry the group no longer holds (acknowledged meanwhile, or the group was deleted) is left
-- alone: {0, 0, now}.
local function fail(stream, zset, att, dlq, group, id, count, dead, err, delay, initial, factor, cap, jitter, max_attempts, now)
  local held = redis.pcall('XPENDING', stream, group, id, id, 1)
  if held.err or #held == 0 then
    return {0, 0, now}
  end
  local n = tonumber(redis.call('HGET', att, id) or '0')
  if count then
    n = n + 1
    redis.call('HSET', att, id, n)
    if err ~= '' then
      redis.call('HSET', att, id .. ':e', err)
    end
    -- The attempt history (the last 20), kept with the dead letter.
    local h = cjson.decode(redis.call('HGET', att, id .. ':h') or '[]')
    h[#h + 1] = {attempt = n, error = err, at = now}
    if #h > 20 then
      table.remove(h, 1)
    end
    redis.call('HSET', att, id .. ':h', cjson.encode(h))
  end
  if dead or (count and n >= max_attempts) then
    local last = err
    if last == '' then
      last = redis.call('HGET', att, id .. ':e') or ''
    end
    local entry = redis.call('XRANGE', stream, id, id)
    if #entry > 0 then
      local fields = entry[1][2]
      for i = 1, #fields, 2 do
        if fields[i] == 'e' then
          redis.call('XADD', dlq, '*', 'e', fields[i + 1], 'error', last, 'attempts', n, 'failed_at', now, 'entry', id,
            'history', redis.call('HGET', att, id .. ':h') or '[]')
        end
      end
    end
    redis.call('XACK', stream, group, id)
    redis.call('HDEL', att, id, id .. ':e', id .. ':h')
    redis.call('ZREM', zset, id)
    return {1, n}
  end
  if delay < 0 then
    local d = initial * (factor ^ math.max(n - 1, 0)) * (0.8 + 0.4 * jitter)
    if d > cap then
      d = cap
    end
    delay = math.floor(d)
  end
  local due = now + delay
  redis.call('ZADD', zset, due, id)
  return {0, n, due}
end

-- The groups of a stream as a table name -> XINFO GROUPS fields (empty when there is no stream).
local function groups_of(stream)
  local info = {}
  if redis.call('EXISTS', stream) == 0 then
    return info
  end
  for _, g in ipairs(redis.call('XINFO', 'GROUPS', stream)) do
    local m = {}
    for i = 1, #g, 2 do
      m[g[i]] = g[i + 1]
    end
    info[m['name']] = m
  end
  return info
end
