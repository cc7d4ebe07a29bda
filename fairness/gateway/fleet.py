"""Fairness across gateway processes: VTC's per-tenant counters, what each gateway has waiting and what each
upstream has in flight, kept in one store (`gateway.store`) that every gateway of a fleet shares; queues stay local.

Each admission round is one server-side script. For each model with requests waiting here, it finds the upstream
serving that model with the fewest requests in flight across the fleet that is under its limit, then the tenant
waiting for that model with the least counter across the fleet. If that tenant waits at this gateway, the script
charges the head request's prompt, moves it to in flight, and returns the pair; otherwise the gateway that holds the
tenant admits it on its next round. A finish anywhere publishes a message that wakes every gateway, so a freed slot
goes to the fleet's next tenant at once (work-conserving). Output tokens are charged every tick in one call, and
each request is settled at its end from the upstream's usage. Store calls go one at a time through a queue
(`StoreQueue`, redis.asyncio): nothing on the event loop waits for them; at most one admission round is in the store
at a time.

A gateway that loses the store keeps serving in its local VTC's order (`/metrics`:
fairness_gateway_shared_state_up 0, and a log line): its counters are the fleet's as last seen plus its own charges
since, and a tenant new since the outage is lifted as VTC lifts it. When the store answers again, the gateway writes
its waiting and in-flight counts anew and adds the charges made meanwhile, each batch at most once (a sequence
number per batch), and refunds an admission whose reply it lost. Gateways write a heartbeat; the counts of one that
stops (killed, or cut off) leave the fleet when its heartbeat expires. Counters survive a store restart where the
store persists (Redis with AOF or RDB); without that they restart from the charges made since, and VTC's lift keeps
a returning tenant from banking credit.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections import defaultdict, deque
from collections.abc import Callable

from fairness.core.policy import SchedulingPolicy, make_policy
from fairness.core.service import W_P, W_Q, service
from fairness.gateway.admission import Admission, Ticket
from fairness.gateway.store import RETRY_S, Beat, SharedState, Skipped, StoreQueue, waiting_field
from fairness.gateway.upstreams import Upstream, UpstreamPool

log = logging.getLogger("fairness.gateway.fleet")


class FleetAdmission(Admission):
    """`Admission` whose order and upstream room come from the fleet's `SharedState` (VTC across gateways); the
    local VTC policy sees every event, and orders admissions while the store is away."""

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
        self.store_errors = 0  # store calls that failed (timed out, refused, or broke off)
        self.local_admissions = 0  # admissions made in the local order while the store was away
        self._retry_at = 0.0
        self._calls: StoreQueue | None = None  # started on the event loop at the first call
        self._listener: asyncio.Task | None = None
        self._queues: dict[tuple[str, str], deque[Ticket]] = {}  # (model, tenant) -> its waiting tickets, oldest first
        self._unsent: dict[str, float] = defaultdict(float)  # charges not yet sent to the store
        self._waiting_delta: dict[str, int] = defaultdict(int)  # waiting field -> change not yet sent
        self._flight_delta: dict[str, int] = defaultdict(int)  # upstream -> change not yet sent
        self._pending: tuple[int, dict[str, float]] | None = None  # a charge batch whose reply was lost: re-sent as is
        self._doubt: int | None = None  # an admission round whose reply was lost (refunded if the store ran it)
        self._charged: dict[int, float] = {}  # request -> what it has been charged so far
        self._seq = itertools.count(1)
        self._admitting = False  # an admission round is in the store
        self._pump_again = False  # pump was called while it was
        self._beating = False  # a heartbeat is in the store
        self._beat_at = -1.0  # when the last heartbeat was sent
        self._outage = False  # a store call failed since the store last took this gateway's counts
        self._gateways = 1  # live gateways in the fleet, as the last heartbeat saw
        self._local_cap = 0  # while the store is away: the most requests this gateway runs at once

    def _cost(self, ticket: Ticket, input_tokens: int, output_tokens: int) -> float:
        return service(input_tokens, output_tokens, ticket.info.weight, W_P, W_Q)

    # --- the store ---------------------------------------------------------------------------------------------------

    def _submit(self, fn: Callable, args: tuple, done: Callable, probe: bool = False) -> None:
        if self._calls is None:
            self._calls = StoreQueue()
        self._calls.submit(fn, args, done, probe)

    def _lost(self, error: Exception) -> None:
        """A store call failed: serve in the local order, and try the store again after RETRY_S."""
        if not isinstance(error, Skipped):
            self.store_errors += 1
            if self.connected:
                log.warning("shared state %s unreachable (%s): serving on local counters", self.state.url, error)
                # the other gateways keep filling the upstreams: keep to what this one ran, or its share
                share = -(-self.pool.capacity() // max(1, self._gateways))
                self._local_cap = max(len(self.running), share)
            self._outage = True
        self.connected, self._retry_at = False, time.monotonic() + RETRY_S

    def sync(self) -> None:
        """Heartbeat, once a tick. Back from an outage (or unknown to the store): write this gateway's counts anew,
        refund an admission whose reply was lost, then send the charges made meanwhile."""
        now = time.monotonic()
        if self._beating or (now < self._retry_at if not self.connected else now - self._beat_at < self.tick_s):
            return  # one heartbeat a tick: the loop wakes on every finish in the fleet
        self._beat_at = now
        force = not self.connected
        waiting, flying = {}, {}
        if force:  # the counts as they are now; what changed before this call is in them
            waiting = {waiting_field(*k): len(q) for k, q in self._queues.items()}
            for t in self.running.values():
                flying[t.upstream.url] = flying.get(t.upstream.url, 0) + 1
            self._waiting_delta.clear()
            self._flight_delta.clear()
        self._beating = True
        args = (waiting, flying, force, self.tenant_idle_s)
        self._submit(self.state.heartbeat, args, lambda beat, err: self._beat(force, beat, err), probe=force)

    def _beat(self, force: bool, beat: Beat | None, error: Exception | None) -> None:
        self._beating = False
        if error is not None:
            self._lost(error)
            return
        self._gateways = beat.gateways
        if beat.state < 0:
            self._resync()
            return
        if not force and not self.connected:  # the gateway lost the store while this was in it: write counts anew
            self.sync()
            return
        if force:
            if self._doubt is not None and beat.admit_seq == self._doubt:  # it ran, but the ticket never started
                self._charge(beat.admit_tenant, -beat.admit_charge)
            self._doubt = None
            if self._outage:
                self._outage = False
                log.warning("shared state %s reachable: merging %d tenants' charges", self.state.url, len(self._unsent))
        self.connected = True
        self._flush()
        self.pump()

    def _flush(self) -> None:
        """Send the charges and count changes made since the last batch (a lost batch first, with its number)."""
        if not self.connected:
            return
        if self._pending is not None:
            (seq, charges), self._pending = self._pending, None
            self._submit(self.state.apply, (seq, charges, {}, {}), self._applied(seq, charges))
        if not (self._unsent or self._waiting_delta or self._flight_delta):
            return
        seq = next(self._seq)
        batch = (seq, dict(self._unsent), dict(self._waiting_delta), dict(self._flight_delta))
        self._unsent.clear()
        self._waiting_delta.clear()
        self._flight_delta.clear()
        self._submit(self.state.apply, batch, self._applied(seq, batch[1]))

    def _applied(self, seq: int, charges: dict[str, float]) -> Callable:
        def done(result: int | None, error: Exception | None) -> None:
            if error is None and result >= 0:
                return
            if error is None or isinstance(error, Skipped):  # stale, or never sent: in the next batch
                for t, amount in charges.items():
                    self._unsent[t] += amount
            else:  # sent, and maybe applied: re-sent with its number, which the store applies at most once
                self._pending = (seq, charges)
            if error is None:
                self._resync()
            else:
                self._lost(error)  # count changes are written anew on reconnection

        return done

    def _resync(self) -> None:
        """The store does not know this gateway as it is (reaped while silent, restarted, or a stale call): write
        its counts anew now."""
        self.connected, self._retry_at = False, 0.0
        self.sync()

    def _charge(self, tenant: str, amount: float) -> None:
        self._unsent[tenant] += amount

    # --- Admission's events -----------------------------------------------------------------------------------------

    def queued(self, ticket: Ticket) -> None:
        """The fleet counts a waiting ticket for its tenant and model (joining a backlog lifts the tenant's counter);
        a resumed one goes first."""
        key = (ticket.model, ticket.info.client)
        queue = self._queues.setdefault(key, deque())
        (queue.appendleft if ticket.requeues else queue.append)(ticket)
        if self.connected:
            self._submit(self.state.join, key, self._joined)
        else:
            self._waiting_delta[waiting_field(*key)] += 1

    def capacity(self) -> int:
        """While the store is away, this gateway keeps to what it ran when it lost the store, or its share of the
        upstreams' limits, whichever is larger: the others go on filling the upstreams."""
        full = super().capacity()
        return full if self.connected else min(full, self._local_cap or full)

    def _joined(self, joined: bool | None, error: Exception | None) -> None:
        if error is not None:  # the counts are written anew on reconnection
            self._lost(error)
        elif not joined:
            self._resync()

    def pump(self) -> None:
        """One admission round in the store (each admission pumps again), or, while it is away, admissions in the
        local policy's order."""
        if not self._queues:
            return
        if not self.connected:
            self.sync()
            super().pump()  # through `_start` below
            return
        if self._admitting:  # asked again when it answers: what made this call may have made room
            self._pump_again = True
            return
        self._pump_again = False
        heads: dict[str, dict[str, float]] = defaultdict(dict)
        for (model, tenant), queue in self._queues.items():
            h = queue[0]  # a resumed request's prompt was charged at its first admission
            heads[model][tenant] = 0.0 if h.requeues else self._cost(h, h.info.input_tokens, 0)
        groups = {}
        for model, tenants in heads.items():
            rooms = {u.url: u.limit.value for u in self.pool.upstreams if u.healthy and model in u.models}
            if rooms:
                groups[model] = (tenants, rooms)
        if not groups:
            return
        seq, self._admitting = next(self._seq), True
        self._submit(self.state.admit, (seq, groups), lambda got, err: self._admitted(seq, groups, got, err))

    def _admitted(self, seq: int, groups: dict, got, error: Exception | None) -> None:
        self._admitting = False
        if error is not None:
            if not isinstance(error, Skipped):
                self._doubt = seq
            self._lost(error)
            self.pump()
            return
        decision, counters = got
        for t, c in counters.items():  # the local order, for an outage: the fleet's counters plus charges unsent
            self.policy.counter.set(t, c + self._unsent.get(t, 0.0))
        if decision[0] == "gone":
            self._resync()
            return
        if decision[0] != "admit":
            if self._pump_again:
                self.pump()
            return
        model, tenant, url = decision[1:]
        key, prompt = (model, tenant), groups[model][0][tenant]
        up = next((u for u in self.pool.upstreams if u.url == url), None)
        if key not in self._queues or up is None:  # cancelled while the round was in the store: undo it
            self._waiting_delta[waiting_field(*key)] += 1
            self._flight_delta[url] -= 1
            self._charge(tenant, -prompt)
            self._flush()
        else:
            self._begin(self._take(key), up, time.monotonic(), prompt)
        self.pump()

    def _take(self, key: tuple[str, str], ticket: Ticket | None = None) -> Ticket:
        """`ticket` (default: the first) leaves the queue of `key`."""
        queue = self._queues[key]
        if ticket is None:
            ticket = queue.popleft()
        else:
            queue.remove(ticket)
        if not queue:
            del self._queues[key]
        return ticket

    def _start(self, ticket: Ticket, up: Upstream, now: float) -> None:
        """An admission in the local order (the store is away), counted for the merge."""
        key = (ticket.model, ticket.info.client)
        self._take(key, ticket)
        self._waiting_delta[waiting_field(*key)] -= 1
        self._flight_delta[up.url] += 1
        prompt = 0.0 if ticket.requeues else self._cost(ticket, ticket.info.input_tokens, 0)
        self._charge(ticket.info.client, prompt)
        self.local_admissions += 1
        self._begin(ticket, up, now, prompt)

    def _begin(self, ticket: Ticket, up: Upstream, now: float, prompt: float) -> None:
        """As `Admission._start`; a resumed request keeps what it was charged at its first admission."""
        self._charged.setdefault(ticket.info.id, prompt)
        super()._start(ticket, up, now)

    def step(self) -> None:
        """Charge the output tokens streamed since the last step, fleet-wide in one call."""
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
        self._charged.pop(ticket.info.id, None)  # a resumed request keeps its first admission's charge
        key = (ticket.model, ticket.info.client)
        if ticket in self._queues.get(key, ()):
            self._take(key, ticket)
            self._waiting_delta[waiting_field(*key)] -= 1
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

    async def run(self) -> None:
        """Admission's loop with a heartbeat every tick, woken too by every finish in the fleet."""
        self._listener = asyncio.create_task(self.state.listen(self.wake.set), name="fairness-fleet-listen")
        self.sync()
        await super().run()

    async def drained(self) -> None:
        """Returns once the store has answered every call this gateway made, and those its answers led to."""
        if self._calls is not None:
            await self._calls.drained()

    async def aclose(self) -> None:
        """Stop the listener and the store's call queue, and close the connection."""
        tasks = [t for t in (self._listener,) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._calls is not None:
            await self._calls.aclose()
        await self.state.aclose()
