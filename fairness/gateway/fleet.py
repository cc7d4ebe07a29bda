"""Fairness across gateway processes: VTC's per-tenant counters, what each gateway has waiting and what each
upstream has in flight, kept in one Redis or Valkey store that every gateway of a fleet shares; queues stay local.

Each admission is one server-side script (one round trip). It finds the upstream with the fewest requests in flight
across the fleet that is under its limit, then the backlogged tenant with the least service across the fleet. If
that tenant waits at this gateway, the script charges the head request's prompt, moves one of the tenant's waiting
requests to in flight, and returns the pair; otherwise this gateway admits nothing, and the gateway that holds the
tenant admits it on its next round. A finish anywhere publishes a message that wakes every gateway, so a freed slot
goes to the fleet's next tenant at once (work-conserving). Output tokens are charged every tick, in one pipelined
call, and each request is settled at its end from the upstream's usage.

A gateway that loses the store keeps serving on its local copy of the counters (`/metrics`:
fairness_gateway_shared_state_up 0, and a log line), and merges back when the store answers again: the charges made
meanwhile are added, and its waiting and in-flight counts are written anew. Gateways write a heartbeat; the state
of one that stops (killed, or cut off) leaves the fleet's counts when its heartbeat expires. Counters survive a store
restart where the store persists (Redis with AOF or RDB); without that they restart from the charges made since,
and VTC's lift keeps a returning tenant from banking credit. Scripts touch keys they compute: a single Redis or
Valkey, not a cluster.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid
from collections import defaultdict, deque
from collections.abc import Callable

from fairness.core.policy import SchedulingPolicy, make_policy
from fairness.core.service import W_P, W_Q, service
from fairness.extras import missing
from fairness.gateway.admission import Admission, Ticket
from fairness.gateway.upstreams import Upstream, UpstreamPool

try:
    import redis
except ImportError as e:
    raise missing("fleet", e) from e

log = logging.getLogger("fairness.gateway.fleet")

HEARTBEAT_TTL_S = 2.0  # a gateway silent this long leaves the fleet's counts
RETRY_S = 1.0  # after a store error, how long a gateway serves on local counters before it tries again
TIMEOUT_S = 0.25  # a store call slower than this counts as the store being unreachable

_ALIVE = """
local p = ARGV[1]
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
"""

# ARGV: prefix, gateway, ttl_ms, force, idle_ms, n waiting, (tenant, count) x n, n in flight, (upstream, count) x n.
# Refresh the heartbeat, and forget (up to 256) tenants not seen for idle_ms: their counters leave the store (VTC's
# lift gives one that returns a fair start). A gateway the fleet does not know (first call, reaped, or the store
# restarted empty), or one back from an outage (force), writes its waiting and in-flight counts anew; returns 1
# when it did.
_HEARTBEAT = (
    _ALIVE
    + """
local gw = ARGV[2]
local idle = redis.call('ZRANGEBYSCORE', p .. 'seen', '-inf', now_ms() - tonumber(ARGV[5]), 'LIMIT', 0, 256)
for _, t in ipairs(idle) do
  redis.call('HDEL', p .. 'counters', t)
  redis.call('ZREM', p .. 'seen', t)
end
local known = redis.call('EXISTS', p .. 'alive:' .. gw) == 1 and redis.call('SISMEMBER', p .. 'gws', gw) == 1
redis.call('SET', p .. 'alive:' .. gw, '1', 'PX', ARGV[3])
if known and ARGV[4] == '0' then return 0 end
redis.call('SADD', p .. 'gws', gw)
redis.call('DEL', p .. 'waiting:' .. gw, p .. 'inflight:' .. gw)
local i = 6
for _, key in ipairs({'waiting:', 'inflight:'}) do
  local n = tonumber(ARGV[i])
  for j = 1, n do
    redis.call('HSET', p .. key .. gw, ARGV[i + 2 * j - 1], ARGV[i + 2 * j])
  end
  i = i + 2 * n + 1
end
return 1
"""
)

# ARGV: prefix, gateway, tenant. One more request of `tenant` waits here; a tenant that joins the fleet's backlog
# is lifted to the least counter among the backlogged (or the last admitted tenant's): idle time banks no credit.
_JOIN = (
    _ALIVE
    + """
local gw, tenant = ARGV[2], ARGV[3]
local waiting, least = 0, nil
for _, g in ipairs(alive()) do
  local w = redis.call('HGETALL', p .. 'waiting:' .. g)
  for j = 1, #w, 2 do
    if tonumber(w[j + 1]) > 0 then
      if w[j] == tenant then waiting = waiting + tonumber(w[j + 1]) end
      local c = counter(w[j])
      if least == nil or c < least then least = c end
    end
  end
end
if waiting == 0 then
  if least == nil then
    local last = redis.call('GET', p .. 'last')
    if last then least = counter(last) end
  end
  if least ~= nil and counter(tenant) < least then redis.call('HSET', p .. 'counters', tenant, least) end
end
redis.call('HINCRBY', p .. 'waiting:' .. gw, tenant, 1)
redis.call('ZADD', p .. 'seen', now_ms(), tenant)
return 1
"""
)

# ARGV: prefix, gateway, n tenants, (tenant, prompt charge) x n, n upstreams, (upstream, limit) x n.
# Returns {'admit', tenant, upstream}, {'other', tenant} (the fleet's next tenant waits elsewhere), {'full'} or
# {'gone'} (this gateway is not registered: heartbeat first); and the counters of the tenants passed.
_ADMIT = (
    _ALIVE
    + """
local gw = ARGV[2]
local gws = alive()
local mine, names, i = {}, {}, 3
local n = tonumber(ARGV[i])
for j = 1, n do
  mine[ARGV[i + 2 * j - 1]] = tonumber(ARGV[i + 2 * j])
  names[#names + 1] = ARGV[i + 2 * j - 1]
end
i = i + 2 * n + 1
local function counters()
  local out = {}
  for _, t in ipairs(names) do out[#out + 1] = tostring(counter(t)) end
  return out
end
if redis.call('SISMEMBER', p .. 'gws', gw) == 0 then return {{'gone'}, counters()} end
local best, load = nil, nil
for j = 1, tonumber(ARGV[i]) do
  local u, limit, used = ARGV[i + 2 * j - 1], tonumber(ARGV[i + 2 * j]), 0
  for _, g in ipairs(gws) do used = used + tonumber(redis.call('HGET', p .. 'inflight:' .. g, u) or '0') end
  if used < limit and (load == nil or used < load) then best, load = u, used end
end
if best == nil then return {{'full'}, counters()} end
local next, least, last = nil, nil, redis.call('GET', p .. 'last')
local function before(t, c)  -- ties (frequent: the lift makes them) go to a tenant other than the last admitted
  if least == nil or c < least then return true end
  if c > least then return false end
  if (t == last) ~= (next == last) then return next == last end
  return t < next
end
for _, g in ipairs(gws) do
  local w = redis.call('HGETALL', p .. 'waiting:' .. g)
  for j = 1, #w, 2 do
    if tonumber(w[j + 1]) > 0 then
      local c = counter(w[j])
      if before(w[j], c) then next, least = w[j], c end
    end
  end
end
if next == nil or mine[next] == nil then return {{'other', next or ''}, counters()} end
redis.call('HINCRBYFLOAT', p .. 'counters', next, mine[next])
redis.call('HINCRBY', p .. 'waiting:' .. gw, next, -1)
redis.call('HINCRBY', p .. 'inflight:' .. gw, best, 1)
redis.call('SET', p .. 'last', next)
redis.call('ZADD', p .. 'seen', now_ms(), next)
return {{'admit', next, best}, counters()}
"""
)


class SharedState:
    """The fleet's store: a Redis or Valkey server at `url` (redis://HOST:PORT[/DB]), keys under `prefix`."""

    def __init__(self, url: str, gateway_id: str | None = None, prefix: str = "fairness:"):
        try:
            self.client = redis.Redis.from_url(url, socket_timeout=TIMEOUT_S, socket_connect_timeout=TIMEOUT_S)
        except ValueError as e:
            raise ValueError(f"--state {url!r} is not a store URL; use redis://HOST:PORT") from e
        self.url, self.prefix = url, prefix
        self.gateway = gateway_id or uuid.uuid4().hex[:12]
        self._heartbeat = self.client.register_script(_HEARTBEAT)
        self._join = self.client.register_script(_JOIN)
        self._admit = self.client.register_script(_ADMIT)

    def heartbeat(
        self, waiting: dict[str, int], in_flight: dict[str, int], force: bool = False, idle_s: float = 600.0
    ) -> bool:
        """Refresh this gateway's heartbeat and forget tenants unseen for `idle_s`; True when the store took this
        gateway's counts anew (it did not know the gateway, or `force`)."""
        args = [self.prefix, self.gateway, int(HEARTBEAT_TTL_S * 1000), int(force), int(idle_s * 1000), len(waiting)]
        args += [x for kv in waiting.items() for x in kv] + [len(in_flight)]
        args += [x for kv in in_flight.items() for x in kv]
        return bool(self._heartbeat(args=args))

    def join(self, tenant: str) -> bool:
        """One more request of `tenant` waits at this gateway (lifting its counter if it joins the backlog)."""
        return bool(self._join(args=[self.prefix, self.gateway, tenant]))

    def admit(self, heads: dict[str, float], rooms: dict[str, int]) -> tuple[list[str], dict[str, float]]:
        """One admission round: heads, tenant -> the prompt charge of its first waiting request here; rooms,
        upstream -> its limit. Returns the decision ([kind, ...] as the script says) and the tenants' counters."""
        args = [self.prefix, self.gateway, len(heads)] + [x for kv in heads.items() for x in kv]
        args += [len(rooms)] + [x for kv in rooms.items() for x in kv]
        decision, counters = self._admit(args=args)
        kinds = [d.decode() if isinstance(d, bytes) else d for d in decision]
        return kinds, {t: float(c) for t, c in zip(heads, counters, strict=True)}

    def apply(self, charges: dict[str, float], waiting: dict[str, int], in_flight: dict[str, int]) -> bool:
        """Add to counters, this gateway's waiting counts and its in-flight counts in one pipelined round trip, and
        wake the fleet when something left an upstream."""
        pipe = self.client.pipeline(transaction=False)
        for t, amount in charges.items():
            pipe.hincrbyfloat(self.prefix + "counters", t, amount)
        if charges:
            now_ms = int(time.time() * 1000)
            pipe.zadd(self.prefix + "seen", dict.fromkeys(charges, now_ms))
        for t, n in waiting.items():
            pipe.hincrby(f"{self.prefix}waiting:{self.gateway}", t, n)
        for u, n in in_flight.items():
            pipe.hincrby(f"{self.prefix}inflight:{self.gateway}", u, n)
        if any(n < 0 for n in in_flight.values()):
            pipe.publish(self.prefix + "room", self.gateway)
        pipe.execute()
        return True

    def listen(self, on_message: Callable[[], None]) -> threading.Thread:
        """A daemon thread calling `on_message()` on every finish in the fleet (resubscribing after an outage)."""
        # its own connection, which waits for messages as long as it takes (the client's timeout is for calls)
        listener = redis.Redis.from_url(self.url, socket_connect_timeout=TIMEOUT_S, health_check_interval=5)

        def run() -> None:
            while True:
                try:
                    sub = listener.pubsub(ignore_subscribe_messages=True)
                    sub.subscribe(self.prefix + "room")
                    for _ in sub.listen():
                        on_message()
                except (redis.RedisError, OSError):
                    time.sleep(RETRY_S)

        thread = threading.Thread(target=run, name="fairness-fleet-listen", daemon=True)
        thread.start()
        return thread


class FleetAdmission(Admission):
    """`Admission` whose order and upstream room come from the fleet's `SharedState` (VTC across gateways); the
    local policy still sees every event, for the metrics. Without the store it admits by its local copy of the
    counters (the last seen, plus its own charges since) into its own view of the upstreams' room."""

    def __init__(
        self,
        state: SharedState,
        policy: str | SchedulingPolicy | Callable[[], SchedulingPolicy],
        pool: UpstreamPool,
        **kwargs,
    ):
        policy = make_policy(policy)
        if policy.name != "vtc":
            raise ValueError(
                f"--state shares VTC's counters across gateways; use --policy vtc with it, not {policy.name!r}"
            )
        super().__init__(policy, pool, **kwargs)
        self.state = state
        self.connected = False
        self._retry_at = 0.0
        self._queues: dict[str, deque[Ticket]] = defaultdict(deque)  # tenant -> its waiting tickets, oldest first
        self._local: dict[str, float] = defaultdict(float)  # the counters as last seen, plus the charges since
        self._unsent: dict[str, float] = defaultdict(float)  # charges not yet in the store
        self._waiting_delta: dict[str, int] = defaultdict(int)  # changes to the store's counts not yet sent
        self._flight_delta: dict[str, int] = defaultdict(int)
        self._charged: dict[int, float] = {}  # request -> what it has been charged so far

    def _cost(self, ticket: Ticket, input_tokens: int, output_tokens: int) -> float:
        return service(input_tokens, output_tokens, ticket.info.weight, W_P, W_Q)

    # --- the store, or local counters while it is away --------------------------------------------------------------

    def _store(self, call: Callable, *args):
        """`call(*args)` on the store (every call returns something); None when it is unreachable (then local
        counters for RETRY_S)."""
        if not self.connected and time.monotonic() < self._retry_at:
            return None
        try:
            out = call(*args)
        except (redis.RedisError, OSError) as e:
            if self.connected:
                log.warning("shared state %s unreachable (%s): serving on local counters", self.state.url, e)
            self.connected, self._retry_at = False, time.monotonic() + RETRY_S
            return None
        return out

    def sync(self) -> None:
        """Heartbeat; back from an outage (or unknown to the store), write this gateway's counts anew, then add the
        charges made meanwhile."""
        if not self.connected and time.monotonic() < self._retry_at:
            return
        waiting = {t: len(q) for t, q in self._queues.items() if q}
        flying: dict[str, int] = defaultdict(int)
        for t in self.running.values():
            if t.upstream is not None:
                flying[t.upstream.url] += 1
        was = self.connected
        fresh = self._store(self.state.heartbeat, waiting, dict(flying), not was, self.tenant_idle_s)
        if fresh is None:
            return
        if not was:
            log.warning("shared state %s reachable: merging %d tenants' charges", self.state.url, len(self._unsent))
        self.connected = True
        if fresh:  # the store holds this gateway's counts as they are now
            self._waiting_delta.clear()
            self._flight_delta.clear()
        self._flush()

    def _flush(self) -> None:
        if not self.connected or not (self._unsent or self._waiting_delta or self._flight_delta):
            return
        sent = (dict(self._unsent), dict(self._waiting_delta), dict(self._flight_delta))
        if self._store(self.state.apply, *sent) is not None:
            self._unsent.clear()
            self._waiting_delta.clear()
            self._flight_delta.clear()

    def _charge(self, tenant: str, amount: float) -> None:
        self._local[tenant] += amount
        self._unsent[tenant] += amount

    # --- Admission's events -----------------------------------------------------------------------------------------

    def queued(self, ticket: Ticket) -> None:
        """The fleet counts a waiting ticket for its tenant (joining its backlog lifts the tenant's counter)."""
        self._queues[ticket.info.client].append(ticket)
        if not self.connected or self._store(self.state.join, ticket.info.client) is None:
            self._waiting_delta[ticket.info.client] += 1

    def pump(self) -> None:
        """Admit while the fleet's next tenant waits here and an upstream has room."""
        while any(self._queues.values()):
            heads = {t: q[0] for t, q in self._queues.items() if q}
            if not self.connected:
                self.sync()
            if not (self._admit_shared(heads) if self.connected else self._admit_local(heads)):
                return

    def _admit_shared(self, heads: dict[str, Ticket]) -> bool:
        """One admission round in the store (a resumed request's prompt was charged at its first admission)."""
        model = next(iter(heads.values())).model
        rooms = {u.url: u.limit.value for u in self.pool.upstreams if u.healthy and model in u.models}
        if not rooms:
            return False
        prompts = {t: 0.0 if h.requeues else self._cost(h, h.info.input_tokens, 0) for t, h in heads.items()}
        got = self._store(self.state.admit, prompts, rooms)
        if got is None:
            return self._admit_local(heads)
        decision, counters = got
        self._local.update(counters)
        if decision[0] == "gone":  # reaped while silent: register again, then the next round
            self.connected = False
            self._retry_at = 0.0
            self.sync()
            return self.connected
        if decision[0] != "admit":
            return False
        tenant, url = decision[1], decision[2]
        up = next(u for u in self.pool.upstreams if u.url == url)
        self._start(self._queues[tenant].popleft(), up, time.monotonic())
        return True

    def _admit_local(self, heads: dict[str, Ticket]) -> bool:
        tenant = min(heads, key=lambda t: (self._local[t], t))
        ticket = heads[tenant]
        up = self.pool.pick(ticket.model)
        if up is None:
            return False
        self._queues[tenant].popleft()
        self._waiting_delta[tenant] -= 1
        self._flight_delta[up.url] += 1
        if not ticket.requeues:
            self._charge(tenant, self._cost(ticket, ticket.info.input_tokens, 0))
        self._start(ticket, up, time.monotonic())
        return True

    def _start(self, ticket: Ticket, up: Upstream, now: float) -> None:
        """As `Admission._start`; a resumed request keeps what it was charged at its first admission."""
        self._charged.setdefault(ticket.info.id, self._cost(ticket, ticket.info.input_tokens, 0))
        super()._start(ticket, up, now)

    def step(self) -> None:
        """Charge the output tokens streamed since the last step, fleet-wide in one round trip."""
        for rid, t in self.running.items():
            if t.generated > t.reported:
                amount = self._cost(t, 0, t.generated - t.reported)
                self._charge(t.info.client, amount)
                self._charged[rid] = self._charged.get(rid, 0.0) + amount
        super().step()
        self._flush()

    def finish(self, ticket: Ticket, output_tokens: int, input_tokens: int) -> None:
        """Settled at the upstream's usage: the difference from what was charged as it streamed."""
        if ticket.ended:
            return
        up = ticket.upstream
        super().finish(ticket, output_tokens, input_tokens)
        self._settle(ticket, up, input_tokens, output_tokens)

    def cancel(self, ticket: Ticket) -> None:
        """Charged what reached the client; a waiting ticket leaves the fleet's count."""
        if ticket.ended:
            return
        up, generated = ticket.upstream, ticket.generated
        super().cancel(ticket)
        if up is not None:
            self._settle(ticket, up, ticket.info.input_tokens, generated)
            return
        queue = self._queues[ticket.info.client]
        if ticket in queue:
            queue.remove(ticket)
            self._waiting_delta[ticket.info.client] -= 1
            self._flush()

    def _settle(self, ticket: Ticket, up: Upstream, input_tokens: int, output_tokens: int) -> None:
        actual = self._cost(ticket, input_tokens, output_tokens)
        self._charge(ticket.info.client, actual - self._charged.pop(ticket.info.id, 0.0))
        self._flight_delta[up.url] -= 1  # its slot goes back to the fleet now, and wakes the other gateways
        self._flush()

    def requeue(self, ticket: Ticket) -> None:
        self._flight_delta[ticket.upstream.url] -= 1
        super().requeue(ticket)
        self._flush()

    def expire(self, now: float) -> None:
        super().expire(now)
        for t in [t for t in self._local if t not in self.known_tenants()]:
            del self._local[t]
            self._queues.pop(t, None)

    async def run(self) -> None:
        """Admission's loop with a heartbeat every tick, woken too by every finish in the fleet."""
        loop = asyncio.get_running_loop()
        self.state.listen(lambda: loop.call_soon_threadsafe(self.wake.set))
        self.sync()
        await super().run()
