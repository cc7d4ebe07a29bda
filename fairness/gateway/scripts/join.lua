-- ARGV: prefix, gateway, incarnation, epoch, model, tenant.
-- One more request of `tenant` waits here for `model`. A tenant that joins the model's backlog is lifted to the
-- least counter among the backlogged (or, with none, the last admitted tenant's): idle time banks no credit.
-- Returns 1, or 0 for a stale call (sent before this gateway's latest forced heartbeat).
local gw, model, tenant = ARGV[2], ARGV[5], ARGV[6]
if not current(gw, ARGV[3], ARGV[4]) then return 0 end
local waiting, least = 0, nil
each_waiting(alive(), model, function(t, n)
  if t == tenant then waiting = waiting + n end
  local c = counter(t)
  if least == nil or c < least then least = c end
end)
if waiting == 0 then
  if least == nil then
    local last = redis.call('GET', p .. 'last:' .. model)
    if last then least = counter(last) end
  end
  if least ~= nil and counter(tenant) < least then redis.call('HSET', p .. 'counters', tenant, least) end
end
redis.call('HINCRBY', p .. 'waiting:' .. gw, model .. SEP .. tenant, 1)
redis.call('ZADD', p .. 'seen', now_ms(), tenant)
return 1
