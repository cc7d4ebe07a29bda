"""The gateway's scheduler: requests wait here, one `PolicyDriver` decides whom to admit next, and an admitted
request goes to the least-loaded upstream with room. The policy is charged with what comes back: the prompt at
admission (estimated, or exact for token ids), output tokens as they stream, settled at the end from `usage`.

One `Admission` owns the queue and the running set; the HTTP layer reaches them only through its methods. It runs
on the event loop, so no locks: policy calls are short and never await.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from fairness.core.driver import EngineObserver, PolicyDriver, require_no_oracle
from fairness.core.engine_model import EngineModel
from fairness.core.policy import SchedulingPolicy, make_policy
from fairness.core.request import RequestInfo
from fairness.core.telemetry import Telemetry
from fairness.gateway.upstreams import Upstream, UpstreamPool


class NoUpstream(Exception):
    """A request waited `queue_timeout_s` without an upstream able to take it."""


class TooManyTenants(Exception):
    """A request from a new tenant while `max_tenants` tenants are known (active, or idle for less than
    `tenant_idle_s`)."""


@dataclass
class Ticket:
    """One request's place at the gateway: waiting (`upstream` None), then running on `upstream`."""

    info: RequestInfo
    model: str
    admitted: asyncio.Future = field(repr=False)  # resolves to the Upstream it is admitted to
    upstream: Upstream | None = None
    generated: int = 0  # output tokens received
    reported: int = 0  # ... of which the policy has been told (on_step)
    requeues: int = 0
    ended: bool = False


class Admission:
    """Per-tenant queues behind one policy, admitting into `pool` while an upstream has room."""

    def __init__(
        self,
        policy: str | SchedulingPolicy | Callable[[], SchedulingPolicy],
        pool: UpstreamPool,
        observers: Sequence[EngineObserver] = (),
        tick_s: float = 0.05,
        tenant_idle_s: float = 600.0,
        max_tenants: int = 10_000,
    ):
        """tenant_idle_s: a tenant with nothing waiting or running for this long is forgotten (the policy's counters
        and the metrics' series drop it; VTC's lift gives it a fair start if it returns). max_tenants: the most
        tenants known at once; a new tenant past it is refused (`TooManyTenants`)."""
        if tenant_idle_s < 0 or max_tenants < 1:
            raise ValueError(f"need tenant_idle_s >= 0 and max_tenants >= 1, got {tenant_idle_s}, {max_tenants}")
        policy = make_policy(policy)
        require_no_oracle(policy)
        self.pool, self.tick_s = pool, tick_s
        self.driver = PolicyDriver(policy, observers)
        # policies that read an engine model (Equinox) get the default step costs and a running cap that never binds
        # before the upstreams' own limits
        cap = sum(u.limit.maximum for u in pool.upstreams)
        self.driver.start(EngineModel(max_running=cap), Telemetry(nvml=False), None)
        self._ids = itertools.count()
        self.waiting: dict[int, Ticket] = {}
        self.running: dict[int, Ticket] = {}
        self.wake = asyncio.Event()  # set by whatever may let a waiting request in (a finish, a probe round)
        self._last_step = time.monotonic()
        self.tenant_idle_s, self.max_tenants = tenant_idle_s, max_tenants
        self._active: dict[str, int] = {}  # tenant -> requests waiting or running
        self._idle: OrderedDict[str, float] = OrderedDict()  # tenant with none -> since when, oldest first

    @property
    def policy(self) -> SchedulingPolicy:
        return self.driver.policy

    # --- the HTTP layer reports -------------------------------------------------------------------------------------

    def known_tenants(self) -> set[str]:
        """Tenants known now: active, or idle for less than tenant_idle_s."""
        return self._active.keys() | self._idle.keys()

    @property
    def tenants(self) -> int:
        """Tenants known now: active, or idle for less than tenant_idle_s."""
        return len(self._active) + len(self._idle)

    def arrive(self, client: str, weight: float, input_tokens: int, max_output: int | None, model: str) -> Ticket:
        now = time.monotonic()
        self.expire(now)
        if client not in self._active and client not in self._idle and self.tenants >= self.max_tenants:
            raise TooManyTenants(
                f"the gateway serves at most {self.max_tenants} tenants at once; retry later, or raise "
                "--max-tenants (each tenant costs a counter, a queue and metric series)"
            )
        self._idle.pop(client, None)
        self._active[client] = self._active.get(client, 0) + 1
        info = RequestInfo(next(self._ids), client, now, max(1, input_tokens), max_output, weight)
        ticket = Ticket(info, model, asyncio.get_running_loop().create_future())
        self.waiting[info.id] = ticket
        self.driver.arrive(info, now)
        self.queued(ticket)
        self.pump()
        return ticket

    async def admitted(self, ticket: Ticket, timeout_s: float) -> Upstream:
        """Wait until the policy admits `ticket`; NoUpstream after timeout_s (it leaves the queue). asyncio.wait, not
        wait_for: on Python < 3.12 wait_for can swallow a cancellation that meets the result."""
        done, _ = await asyncio.wait({ticket.admitted}, timeout=timeout_s)
        if not done:
            self.cancel(ticket)
            raise NoUpstream(f"no upstream serving {ticket.model!r} had room within {timeout_s:g} s")
        return ticket.admitted.result()

    def tokens(self, ticket: Ticket, n: int) -> None:
        """`n` more output tokens reached the client (reported to the policy at the next tick)."""
        ticket.generated += n

    def finish(self, ticket: Ticket, output_tokens: int, input_tokens: int) -> None:
        """The upstream finished `ticket` with these counts (its `usage`); the policy settles with them."""
        if self._end(ticket):
            self.driver.finish(ticket.info, output_tokens, time.monotonic(), input_tokens)

    def cancel(self, ticket: Ticket) -> None:
        """The client left, or the request failed: charged only what reached the client, the rest refunded."""
        waiting = ticket.upstream is None
        if self._end(ticket):
            self.driver.cancel(ticket.info, None if waiting else ticket.generated, time.monotonic())

    def requeue(self, ticket: Ticket) -> None:
        """Its upstream could not take it before any token: back to the front of its tenant's queue (the policy sees
        a preemption, so it is not charged twice)."""
        self._release(ticket)
        del self.running[ticket.info.id]
        ticket.requeues += 1
        ticket.admitted = asyncio.get_running_loop().create_future()
        self.waiting[ticket.info.id] = ticket
        self.driver.preempt(ticket.info, time.monotonic())
        self.queued(ticket)
        self.pump()

    def queued(self, ticket: Ticket) -> None:
        """`ticket` joined the queue (new, or requeued); a fleet's admission counts it in the shared state."""

    # --- scheduling -------------------------------------------------------------------------------------------------

    def pump(self) -> None:
        """Admit waiting requests in the policy's order while an upstream has room."""
        now = time.monotonic()
        _, cap = self.driver.limits(now, 1 << 30, max(1, self.capacity()))

        def room() -> bool:
            return len(self.running) < cap and self.pool.has_room()

        for info in self.driver.candidates(now, room):
            ticket = self.waiting[info.id]
            up = self.pool.pick(ticket.model)
            if up is None:
                break  # its model's upstreams are full or down: it stays first in line
            self._start(ticket, up, now)

    def capacity(self) -> int:
        """The most requests this gateway runs at once: the healthy upstreams' limits (a fleet's gateway cut off from
        the store keeps to its share)."""
        return self.pool.capacity()

    def _start(self, ticket: Ticket, up: Upstream, now: float) -> None:
        """`ticket` leaves the queue to run on `up`; the policy and the observers see it admitted."""
        self.driver.admit(ticket.info, now)
        del self.waiting[ticket.info.id]
        self.running[ticket.info.id] = ticket
        ticket.upstream = up
        up.in_flight += 1
        ticket.admitted.set_result(up)

    def step(self) -> None:
        """Report the output tokens that streamed since the last step to the policy, as one engine step."""
        now = time.monotonic()
        generated = {}
        for rid, t in self.running.items():
            if t.generated > t.reported:
                generated[rid] = t.generated - t.reported
                t.reported = t.generated
        if generated:
            self.driver.step(generated, now - self._last_step, now)
        self._last_step = now

    def sync(self) -> None:
        """Once a tick, before stepping: a fleet's admission exchanges its state with the store."""

    async def aclose(self) -> None:
        """The gateway stops: a fleet's admission stops its tasks and closes its store connection."""

    async def run(self) -> None:
        """Step and admit every tick_s, and at once when something may have made room. Cancelling it ends it (no
        wait_for: on Python < 3.12 it can swallow the cancellation, and this loop would never end)."""
        while True:
            woken = asyncio.ensure_future(self.wake.wait())
            try:
                await asyncio.wait({woken}, timeout=self.tick_s)
            finally:
                woken.cancel()
            self.wake.clear()
            self.sync()
            self.step()
            self.pump()
            self.expire(time.monotonic())

    # --- internals --------------------------------------------------------------------------------------------------

    def expire(self, now: float) -> None:
        """Forget the tenants idle for tenant_idle_s (oldest first: O(1) per tenant forgotten). One the policy must
        still keep (an RPM window) is asked again after another tenant_idle_s."""
        kept = []
        while self._idle:
            client, since = next(iter(self._idle.items()))
            if now - since < self.tenant_idle_s:
                break
            del self._idle[client]
            if not self.driver.forget(client, now):
                kept.append(client)
        for client in kept:
            self._idle[client] = now

    def _end(self, ticket: Ticket) -> bool:
        """Take `ticket` out of the queue or the running set (once); True the first time."""
        if ticket.ended:
            return False
        ticket.ended = True
        client = ticket.info.client
        self._active[client] -= 1
        if not self._active[client]:
            del self._active[client]
            self._idle[client] = time.monotonic()
        if ticket.upstream is None:
            del self.waiting[ticket.info.id]
            return True
        self.step()  # its last tokens reach the policy as a step before it settles
        del self.running[ticket.info.id]
        self._release(ticket)
        self.wake.set()
        return True

    def _release(self, ticket: Ticket) -> None:
        up, ticket.upstream = ticket.upstream, None
        if up is not None:
            up.in_flight -= 1
