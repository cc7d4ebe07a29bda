-- ARGV: prefix, gateway, incarnation, epoch, ttl_ms, force, idle_ms, n waiting, (model SEP tenant, count) x n,
--       n in flight, (upstream, count) x n.
-- Refreshes the heartbeat and forgets (up to 256) tenants unseen for idle_ms: their counters leave the store (VTC's
-- lift gives one that returns a fair start). With force (first call, back from an outage, or told it is unknown),
-- makes `epoch` current and writes this gateway's waiting and in-flight counts anew; without it, a gateway the fleet
-- does not know as it is (reaped, restarted, or the store restarted empty) is told so and writes nothing.
-- Returns {state, admit_seq, admit_tenant, admit_charge, gateways}: state 1 = counts written, 0 = known, -1 =
-- unknown; the last admission this incarnation was charged for (so a gateway that lost an admission's reply can
-- refund it); the live gateways.
local gw, inc, epoch = ARGV[2], ARGV[3], ARGV[4]
local idle = redis.call('ZRANGEBYSCORE', p .. 'seen', '-inf', now_ms() - tonumber(ARGV[7]), 'LIMIT', 0, 256)
for _, t in ipairs(idle) do
  redis.call('HDEL', p .. 'counters', t)
  redis.call('HDEL', p .. 'charged', t)
  redis.call('ZREM', p .. 'seen', t)
end
local key = p .. 'seq:' .. gw
local rec = redis.call('HMGET', key, 'inc', 'admit_seq', 'admit_tenant', 'admit_charge')
local last = {'0', '', '0'}
if rec[1] == inc and rec[2] then last = {rec[2], rec[3], rec[4]} end
local known = redis.call('EXISTS', p .. 'alive:' .. gw) == 1 and redis.call('SISMEMBER', p .. 'gws', gw) == 1
if ARGV[6] == '0' then
  if not (known and current(gw, inc, epoch)) then return {-1, last[1], last[2], last[3], #alive()} end
  redis.call('SET', p .. 'alive:' .. gw, '1', 'PX', ARGV[5])
  return {0, last[1], last[2], last[3], #alive()}
end
if rec[1] ~= inc then redis.call('DEL', key) end
redis.call('HSET', key, 'inc', inc, 'epoch', epoch)
redis.call('PEXPIRE', key, SEQ_TTL_MS)
redis.call('SET', p .. 'alive:' .. gw, '1', 'PX', ARGV[5])
redis.call('SADD', p .. 'gws', gw)
redis.call('DEL', p .. 'waiting:' .. gw, p .. 'inflight:' .. gw)
local i = 8
for _, k in ipairs({'waiting:', 'inflight:'}) do
  local n = tonumber(ARGV[i])
  for j = 1, n do
    redis.call('HSET', p .. k .. gw, ARGV[i + 2 * j - 1], ARGV[i + 2 * j])
  end
  i = i + 2 * n + 1
end
return {1, last[1], last[2], last[3], #alive()}
