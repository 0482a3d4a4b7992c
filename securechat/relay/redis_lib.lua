#!lua name=securechat
-- The relay's mailboxes in Redis (issue 16). Loaded by securechat/relay/redis_store.py with
-- FUNCTION LOAD REPLACE; functions persist in the AOF, so a restarted Redis still has them.
--
-- Keys of one mailbox share the hash tag {<mailbox hex>} (one Redis Cluster slot):
--   q    sorted set: member = sender (32 bytes) .. msg_id (16 bytes), score = sequence
--   m    hash: n = last sequence, f = frames stored, b = payload bytes stored,
--        x = when the mailbox's keys expire (ms; pushed on only when a frame could outlive it)
--   d    hash: member -> payload (opaque ciphertext)
--   t    hash: member -> "ts expires origin" (ms, ms, the sender's address prefix)
--   k    string: the identity of this mailbox has connected ("known"); never expires
--   on   string: the node the mailbox's connection is on (pub/sub target)
--   spk  string: signed prekey;  otk  list: one-time prekeys (handed out once: LPOP)
-- Per sender and per prefix counters of stored bytes: hashes sc:s:<sender>, sc:o:<prefix>
-- (v = bytes, x = when the key expires, ms).
-- The sorted set's member -> score is the idempotency map (Signal keeps a separate hash
-- from GUID to id; here the member *is* the (sender, msg_id) key, so ZSCORE answers it).

local OVERHEAD_MS = 60000 -- keys live a minute past their last frame's expiry

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

local function num(v)
  return tonumber(v or '0') or 0
end

local function parse_meta(meta)
  local ts, expires, origin = string.match(meta, '^(%d+) (%d+) (.*)$')
  return tonumber(ts), tonumber(expires), origin
end

local function decrease(key, amount)
  local left = redis.call('HINCRBY', key, 'v', -amount)
  if left <= 0 then redis.call('DEL', key) end
end

-- Forget one stored frame (acknowledged or expired) and its share of the quotas.
local function drop(q, m, d, t, member)
  local meta = redis.call('HGET', t, member)
  if not meta then return 0 end
  local size = redis.call('HSTRLEN', d, member)
  local _, _, origin = parse_meta(meta)
  redis.call('ZREM', q, member)
  redis.call('HDEL', d, member)
  redis.call('HDEL', t, member)
  redis.call('HINCRBY', m, 'f', -1)
  redis.call('HINCRBY', m, 'b', -size)
  decrease('sc:s:' .. string.sub(member, 1, 32), size)
  if origin ~= '' then decrease('sc:o:' .. origin, size) end
  return 1
end

-- KEYS q m d t k on;  ARGV member ts payload force origin ttl unknown_ttl quota_frames
-- quota_bytes unknown_frames unknown_bytes sender_quota prefix_quota self_node mailbox
-- Returns {result, seq}: 1 inserted, 2 duplicate, 3 over quota, 5 sender, 6 prefix,
-- 7 unknown mailbox full (the values of mailboxes.InsertResult).
-- Twelve Redis calls (measured: 40 us of Redis CPU with twenty-two, one PEXPIRE per key per
-- frame); the keys' expiry is pushed forward only when a new frame could outlive it.
local function insert(keys, args)
  local q, m, d, t, k, on = keys[1], keys[2], keys[3], keys[4], keys[5], keys[6]
  local member, ts, payload, origin = args[1], tonumber(args[2]), args[3], args[5]
  local old = redis.call('ZSCORE', q, member)
  if old then return {2, tonumber(old)} end
  local size = string.len(payload)
  local known = redis.call('EXISTS', k) == 1
  local skey = 'sc:s:' .. string.sub(member, 1, 32)
  local okey = 'sc:o:' .. origin
  local meta = redis.call('HMGET', m, 'f', 'b', 'n', 'x')
  local frames, bytes, last, keys_until = num(meta[1]), num(meta[2]), num(meta[3]), num(meta[4])
  local sender = redis.call('HMGET', skey, 'v', 'x')
  local network = {false, false}
  if origin ~= '' then network = redis.call('HMGET', okey, 'v', 'x') end
  if args[4] ~= '1' then
    if known then
      if frames + 1 > tonumber(args[8]) or bytes + size > tonumber(args[9]) then return {3, 0} end
    elseif frames + 1 > math.min(tonumber(args[10]), tonumber(args[8]))
        or bytes + size > math.min(tonumber(args[11]), tonumber(args[9])) then
      return {7, 0}
    end
    if num(sender[1]) + size > tonumber(args[12]) then return {5, 0} end
    if origin ~= '' and num(network[1]) + size > tonumber(args[13]) then return {6, 0} end
  end
  local full_ttl = tonumber(args[6])
  local ttl = full_ttl
  if not known then ttl = math.min(ttl, tonumber(args[7])) end
  local seq = last + 1
  if last == 0 then
    -- A new (or expired) queue starts at the clock, not at 1: a connection whose cursor
    -- is past an expired queue's last sequence must still see the new queue's frames.
    seq = now_ms() * 1024
  end
  redis.call('ZADD', q, seq, member)
  redis.call('HSET', d, member, payload)
  redis.call('HSET', t, member, ts .. ' ' .. (ts + ttl) .. ' ' .. origin)
  local slack = math.max(OVERHEAD_MS, math.floor(full_ttl / 8))
  local life_until = ts + full_ttl + slack
  if keys_until < ts + full_ttl then -- this frame could outlive the keys: push them on
    redis.call('HSET', m, 'f', frames + 1, 'b', bytes + size, 'n', seq, 'x', life_until)
    for _, key in ipairs({q, m, d, t}) do redis.call('PEXPIREAT', key, life_until) end
  else
    redis.call('HSET', m, 'f', frames + 1, 'b', bytes + size, 'n', seq)
  end
  local function count(key, state)
    redis.call('HINCRBY', key, 'v', size)
    if num(state[2]) < ts + full_ttl then
      redis.call('HSET', key, 'x', life_until)
      redis.call('PEXPIREAT', key, life_until)
    end
  end
  count(skey, sender)
  if origin ~= '' then count(okey, network) end
  local holder = redis.call('GET', on)
  if holder then
    local node = string.match(holder, '^%d+ (.*)$')
    if node and node ~= args[14] then redis.call('PUBLISH', 'sc:node:' .. node, args[15]) end
  end
  return {1, seq}
end

-- KEYS q m d t otk;  ARGV cursor limit max_bytes
-- Returns {otk count, seq, member, ts, payload, seq, member, ...}: frames after the
-- cursor, in order, not expired (expired ones met on the way are dropped).
local function fetch(keys, args)
  local q, m, d, t, otk = keys[1], keys[2], keys[3], keys[4], keys[5]
  local limit, max_bytes = tonumber(args[2]), tonumber(args[3])
  local out = {redis.call('LLEN', otk)}
  local rows = redis.call('ZRANGEBYSCORE', q, '(' .. args[1], '+inf', 'WITHSCORES', 'LIMIT', 0, limit)
  local now = now_ms()
  local size = 0
  for i = 1, #rows, 2 do
    local member = rows[i]
    local meta = redis.call('HGET', t, member)
    local payload = redis.call('HGET', d, member)
    if meta and payload then
      local ts, expires = parse_meta(meta)
      if expires < now then
        drop(q, m, d, t, member)
      else
        table.insert(out, rows[i + 1])
        table.insert(out, member)
        table.insert(out, ts)
        table.insert(out, payload)
        size = size + string.len(payload)
        if max_bytes > 0 and size >= max_bytes then break end
      end
    end
  end
  return out
end

-- KEYS q m d t;  ARGV member...  Returns how many were deleted.
local function delete(keys, args)
  local n = 0
  for _, member in ipairs(args) do n = n + drop(keys[1], keys[2], keys[3], keys[4], member) end
  return n
end

-- KEYS spk otk;  ARGV spk max_stored otk...  Returns {held, changed, refused}.
-- Idempotent (a retried publish adds nothing twice: a one-time prekey handed out twice
-- would break its promise).
local function publish(keys, args)
  local spk, otk = keys[1], keys[2]
  local old = redis.call('GET', spk)
  local new = args[1]
  if #args > 2 and new == '' and not old then
    return {redis.call('LLEN', otk), 0, 1}
  end
  local changed = 0
  if new ~= '' and new ~= old then
    redis.call('SET', spk, new)
    changed = 1
  end
  local held = redis.call('LLEN', otk)
  local room = tonumber(args[2]) - held
  if room > 0 and #args > 2 then
    local have = {}
    for _, v in ipairs(redis.call('LRANGE', otk, 0, -1)) do have[v] = true end
    for i = 3, #args do
      if room <= 0 then break end
      if not have[args[i]] then
        redis.call('RPUSH', otk, args[i])
        have[args[i]] = true
        room = room - 1
        changed = 1
      end
    end
  end
  return {redis.call('LLEN', otk), changed, 0}
end

-- KEYS spk otk;  ARGV one_time ('1' or '0').  Returns {spk or '', otk or '', left}.
local function take(keys, args)
  local spk = redis.call('GET', keys[1])
  if not spk then return {'', '', redis.call('LLEN', keys[2])} end
  local otk = ''
  if args[1] == '1' then otk = redis.call('LPOP', keys[2]) or '' end
  return {spk, otk, redis.call('LLEN', keys[2])}
end

-- KEYS k t;  ARGV ttl_ms.  Returns 1 the first time: waiting frames get the full ttl.
local function mark_known(keys, args)
  if not redis.call('SET', keys[1], '1', 'NX') then return 0 end
  local ttl = tonumber(args[1])
  local all = redis.call('HGETALL', keys[2])
  for i = 1, #all, 2 do
    local ts, _, origin = parse_meta(all[i + 1])
    redis.call('HSET', keys[2], all[i], ts .. ' ' .. (ts + ttl) .. ' ' .. origin)
  end
  return 1
end

-- KEYS on;  ARGV node since.  The mailbox's connection is now on this node, unless a
-- newer connection (a later ``since``, ns) holds it already. Value: "since node".
local function claim(keys, args)
  local holder = redis.call('GET', keys[1])
  if holder then
    local since = tonumber(string.match(holder, '^(%d+) '))
    if since and since > tonumber(args[2]) then return 0 end
  end
  redis.call('SET', keys[1], args[2] .. ' ' .. args[1])
  return 1
end

-- KEYS on;  ARGV node since.  Released only if still this connection's.
local function release(keys, args)
  if redis.call('GET', keys[1]) == args[2] .. ' ' .. args[1] then redis.call('DEL', keys[1]) end
  return 1
end

-- Token buckets shared by every node (guard.Budgets): KEYS a b; ARGV rate_a burst_a
-- cost_a rate_b burst_b cost_b take ('1': take when both allow).
-- Returns the seconds to wait as text (0 when taken).
local function bucket_wait(key, rate, burst, cost, now)
  local state = redis.call('HMGET', key, 'v', 'at')
  local tokens, at = tonumber(state[1]), tonumber(state[2])
  if not tokens then tokens, at = burst, now end
  tokens = math.min(tokens + (now - at) / 1000 * rate, burst)
  local wait = 0
  if tokens < cost then
    if rate <= 0 then wait = 1e9 else wait = (cost - tokens) / rate end
  end
  return tokens, wait
end

local function bucket_store(key, tokens, rate, burst, now)
  redis.call('HSET', key, 'v', tostring(tokens), 'at', now)
  local full_in = 1000
  if rate > 0 then full_in = math.ceil((burst - tokens) / rate * 1000) + 1000 end
  redis.call('PEXPIRE', key, full_in)
end

local function charge(keys, args)
  local now = now_ms()
  local ra, ba, ca = tonumber(args[1]), tonumber(args[2]), tonumber(args[3])
  local ta, wa = bucket_wait(keys[1], ra, ba, ca, now)
  local tb, wb, rb, bb, cb = 0, 0, 0, 0, 0
  if keys[2] then
    rb, bb, cb = tonumber(args[4]), tonumber(args[5]), tonumber(args[6])
    tb, wb = bucket_wait(keys[2], rb, bb, cb, now)
  end
  local wait = math.max(wa, wb)
  if wait > 0 then return tostring(wait) end
  bucket_store(keys[1], ta - ca, ra, ba, now)
  if keys[2] then bucket_store(keys[2], tb - cb, rb, bb, now) end
  return '0'
end

redis.register_function{function_name='sc_insert', callback=insert}
redis.register_function{function_name='sc_fetch', callback=fetch, flags={'allow-oom'}}
redis.register_function{function_name='sc_delete', callback=delete, flags={'allow-oom'}}
redis.register_function{function_name='sc_publish', callback=publish}
redis.register_function{function_name='sc_take', callback=take, flags={'allow-oom'}}
redis.register_function{function_name='sc_mark_known', callback=mark_known}
redis.register_function{function_name='sc_claim', callback=claim, flags={'allow-oom'}}
redis.register_function{function_name='sc_release', callback=release, flags={'allow-oom'}}
redis.register_function{function_name='sc_charge', callback=charge, flags={'allow-oom'}}
