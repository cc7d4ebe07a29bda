-- ARGV: prefix, gateway, incarnation, epoch, seq, n charges, (tenant, amount) x n, n waiting, (model SEP tenant, delta) x n,
--       n in flight, (upstream, delta) x n.
-- Adds charges to counters (and to what the fleet billed), and this gateway's changes to its waiting and in-flight
-- counts, at most once per sequence number: a batch re-sent after its reply was lost is not applied twice.
-- Publishes on `room` when something left an upstream. Returns 1 when applied, 0 for a duplicate, -1 for a stale
-- call (sent before this gateway's latest forced heartbeat, or to a store that forgot it): nothing applied.
local gw, seq = ARGV[2], tonumber(ARGV[5])
if not current(gw, ARGV[3], ARGV[4]) then return -1 end
if applied(gw, seq) then return 0 end
local now, i, freed = now_ms(), 6, false
local n = tonumber(ARGV[i])
for j = 1, n do charge(ARGV[i + 2 * j - 1], tonumber(ARGV[i + 2 * j]), now) end
i = i + 2 * n + 1
for _, key in ipairs({'waiting:', 'inflight:'}) do
  n = tonumber(ARGV[i])
  for j = 1, n do
    local d = tonumber(ARGV[i + 2 * j])
    bump(p .. key .. gw, ARGV[i + 2 * j - 1], d)
    if key == 'inflight:' and d < 0 then freed = true end
  end
  i = i + 2 * n + 1
end
if freed then redis.call('PUBLISH', p .. 'room', gw) end
return 1
