-- ARGV: prefix, gateway, incarnation, epoch, seq, n models, then per model:
--       model, n heads, (tenant, prompt charge) x n, n upstreams, (upstream, limit) x n.
-- For each model in turn: the least-loaded upstream under its limit across the fleet, then the backlogged tenant
-- with the least counter across the fleet. If that tenant waits here, charge its head's prompt, move one of its
-- requests from waiting to in flight, and stop.
-- Returns {decision, counters}: decision {'admit', model, tenant, upstream}, {'none'} (full, or the next tenants
-- wait at other gateways) or {'gone'} (this gateway is not registered as it is, or the call is stale: heartbeat
-- first); counters: tenant, counter for every head passed.
local gw, seq = ARGV[2], tonumber(ARGV[5])
local gws = alive()
local groups, i = {}, 7
for _ = 1, tonumber(ARGV[6]) do
  local g = {model = ARGV[i], mine = {}, ups = {}}
  local n = tonumber(ARGV[i + 1])
  for j = 1, n do g.mine[ARGV[i + 2 * j]] = tonumber(ARGV[i + 2 * j + 1]) end
  i = i + 2 * n + 2
  n = tonumber(ARGV[i])
  for j = 1, n do g.ups[#g.ups + 1] = {ARGV[i + 2 * j - 1], tonumber(ARGV[i + 2 * j])} end
  i = i + 2 * n + 1
  groups[#groups + 1] = g
end
local function counters()
  local out = {}
  for _, g in ipairs(groups) do
    for t, _ in pairs(g.mine) do out[#out + 1] = t; out[#out + 1] = tostring(counter(t)) end
  end
  return out
end
if redis.call('SISMEMBER', p .. 'gws', gw) == 0 or not current(gw, ARGV[3], ARGV[4]) then
  return {{'gone'}, counters()}
end

local function least_loaded(ups)
  local best, load = nil, nil
  for _, u in ipairs(ups) do
    local used = 0
    for _, g in ipairs(gws) do used = used + tonumber(redis.call('HGET', p .. 'inflight:' .. g, u[1]) or '0') end
    if used < u[2] and (load == nil or used < load) then best, load = u[1], used end
  end
  return best
end

for _, g in ipairs(groups) do
  local up = least_loaded(g.ups)
  if up ~= nil then
    local next, least, last = nil, nil, redis.call('GET', p .. 'last:' .. g.model)
    each_waiting(gws, g.model, function(t, _)
      local c = counter(t)
      -- ties (frequent: the lift makes them) go to a tenant other than the last admitted, then by name
      local better = least == nil or c < least
      if not better and c == least then
        if (t == last) ~= (next == last) then better = next == last else better = t < next end
      end
      if better then next, least = t, c end
    end)
    if next ~= nil and g.mine[next] ~= nil then
      local now = now_ms()
      charge(next, g.mine[next], now)
      bump(p .. 'waiting:' .. gw, g.model .. SEP .. next, -1)
      redis.call('HINCRBY', p .. 'inflight:' .. gw, up, 1)
      redis.call('SET', p .. 'last:' .. g.model, next)
      applied(gw, seq)
      redis.call('HSET', p .. 'seq:' .. gw, 'admit_seq', seq, 'admit_tenant', next, 'admit_charge', g.mine[next])
      return {{'admit', g.model, next, up}, counters()}
    end
  end
end
return {{'none'}, counters()}
