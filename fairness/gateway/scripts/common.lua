-- Prepended to every fleet script. ARGV[1] is the keys' prefix. Keys (all under the prefix):
--   gws                 set of gateway ids; alive:<gw> expires when a gateway stops its heartbeat
--   waiting:<gw>        hash, model .. SEP .. tenant -> requests waiting there (a field leaves at 0)
--   inflight:<gw>       hash, upstream -> requests it started there (a field leaves at 0)
--   counters            hash, tenant -> VTC counter (charges plus lifts)
--   charged             hash, tenant -> the sum of its charges (no lifts): what the fleet billed it
--   seen                sorted set, tenant -> last activity (ms): the idle sweep's index
--   last:<model>        the tenant admitted last for a model (VTC's lift with an empty backlog; ties)
--   seq:<gw>            hash: inc (the gateway process's incarnation), epoch (its count of forced heartbeats: a
--                       call sent before the latest one is stale, refused if it arrives late), n (the last sequence
--                       number applied), admit_seq / admit_tenant / admit_charge (its last admission that charged)
local p = ARGV[1]
local SEP = '\31'
local SEQ_TTL_MS = 3600000  -- a gateway's sequence record outlives any outage it can resolve

local function alive()
  local out = {}
  for _, g in ipairs(redis.call('SMEMBERS', p .. 'gws')) do
    if redis.call('EXISTS', p .. 'alive:' .. g) == 1 then
      out[#out + 1] = g
    else
      redis.call('DEL', p .. 'waiting:' .. g, p .. 'inflight:' .. g)
      redis.call('SREM', p .. 'gws', g)
    end
  end
  return out
end

local function counter(t)
  return tonumber(redis.call('HGET', p .. 'counters', t) or '0')
end

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- add n to a count field; the field leaves the hash at zero, so a hash holds only what is live
local function bump(key, field, n)
  if redis.call('HINCRBY', key, field, n) <= 0 then redis.call('HDEL', key, field) end
end

-- calls fn(tenant, count) for every tenant waiting for `model` at a live gateway
local function each_waiting(gws, model, fn)
  local head = model .. SEP
  for _, g in ipairs(gws) do
    local w = redis.call('HGETALL', p .. 'waiting:' .. g)
    for j = 1, #w, 2 do
      if string.sub(w[j], 1, #head) == head then fn(string.sub(w[j], #head + 1), tonumber(w[j + 1])) end
    end
  end
end

local function charge(t, amount, now)
  redis.call('HINCRBYFLOAT', p .. 'counters', t, amount)
  redis.call('HINCRBYFLOAT', p .. 'charged', t, amount)
  redis.call('ZADD', p .. 'seen', now, t)
end

-- true when (incarnation, epoch) is the gateway's current one, as its latest forced heartbeat wrote it
local function current(gw, inc, epoch)
  local rec = redis.call('HMGET', p .. 'seq:' .. gw, 'inc', 'epoch')
  return rec[1] == inc and rec[2] == epoch
end

-- true when sequence number `seq` was applied before; records it otherwise
local function applied(gw, seq)
  local key = p .. 'seq:' .. gw
  if tonumber(redis.call('HGET', key, 'n') or '0') >= seq then return true end
  redis.call('HSET', key, 'n', seq)
  redis.call('PEXPIRE', key, SEQ_TTL_MS)
  return false
end
