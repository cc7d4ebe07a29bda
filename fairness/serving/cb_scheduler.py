"""A scheduler for transformers' continuous-batching engine whose admission order and eviction victims come from a
`fairness` policy, charged with the service the engine really delivers, token by token.

transformers builds its scheduler from `ContinuousBatchingConfig.scheduler_type` through `SCHEDULER_MAPPING`;
`register_scheduler(policy)` adds an entry there and returns its name:

    scheduler_type = fairness.serving.cb_scheduler.register_scheduler("vtc", clients)
    model.init_continuous_batching(continuous_batching_config=ContinuousBatchingConfig(scheduler_type=...))

Each step, running decodes and unfinished prefills go first (never stalled), then the policy admits waiting requests
one at a time (`next_request`) while they fit; a request that does not fit stops admission for the step, as in the
simulator. When the KV cache runs out, the engine evicts starved requests newest-first: their order comes from the
policy's `preemption_victim`. Clients are named per request in a shared `ClientDirectory` (the server fills it).
"""

from __future__ import annotations

import functools
import itertools
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from transformers.generation.continuous_batching.requests import FutureRequestState, RequestState, RequestStatus
from transformers.generation.continuous_batching.scheduler import Scheduler

from fairness.core.driver import EngineObserver, PolicyDriver
from fairness.core.engine_model import EngineModel
from fairness.core.policy import SchedulingPolicy, make_policy
from fairness.core.request import RequestInfo
from fairness.core.telemetry import Telemetry
from fairness.serving import compat

REFIT_EVERY = 64  # steps between refits of the engine model the policy sees


@dataclass(frozen=True)
class Client:
    """Who sent a request: its client name, weight (share), and when it arrived (time.monotonic())."""

    name: str = "anonymous"
    weight: float = 1.0
    arrival: float | None = None


class ClientDirectory:
    """request id -> Client, written by the server before it submits a request, read by the scheduler."""

    def __init__(self) -> None:
        self._clients: dict[str, Client] = {}
        self._lock = threading.Lock()

    def register(self, request_id: str, client: Client) -> None:
        with self._lock:
            self._clients[request_id] = client

    def get(self, request_id: str) -> Client:
        with self._lock:
            return self._clients.get(request_id, Client())

    def forget(self, request_id: str) -> None:
        with self._lock:
            self._clients.pop(request_id, None)


class FairScheduler(Scheduler):
    """transformers' `Scheduler` with a fairness policy deciding whom to admit and whom to evict."""

    def __init__(
        self,
        cache,
        safety_margin: float | None,
        max_requests_per_batch: int,
        *,
        policy: Callable[[], SchedulingPolicy],
        clients: ClientDirectory,
        telemetry: Telemetry | None = None,
        max_running: int | None = None,
        steps: list[tuple[int, int, int, float]] | None = None,
        observers: tuple[EngineObserver, ...] = (),
    ):
        self._make_policy, self.clients, self.observers = policy, clients, observers
        self.telemetry = telemetry or Telemetry(nvml=False)
        self.max_running = max_running
        self.samples = steps if steps is not None else []  # measured steps (prefill, decodes, context, s): fit input
        super().__init__(cache, 0.15 if safety_margin is None else safety_margin, max_requests_per_batch)

    def reset(self) -> None:
        super().reset()
        self.driver = PolicyDriver(self._make_policy(), self.observers)
        self._ids = itertools.count()
        self._info: dict[str, RequestInfo] = {}  # request id -> what the policy knows of it
        self._rid: dict[int, str] = {}  # the policy's id -> request id
        self._running: set[str] = set()  # admitted, not finished (as the policy sees it)
        self._charged: dict[str, int] = {}  # generated tokens already reported to the policy
        self._arrivals: list[RequestState] = []
        self._finishing: dict[str, int] = {}  # left the engine since the last step: total generated
        self._requeued: list[str] = []  # ... of which evicted and requeued: back in the policy's queue
        self._offer: tuple[RequestInfo, RequestState] | None = None
        self._last_step: tuple[float, int, int, int] | None = None  # (time, prefill, decodes, context) of the batch
        self.engine = EngineModel(
            kv_tokens=max(1, self.cache.max_tokens_read),
            max_step_tokens=max(1, self.cache.max_batch_tokens),
            max_running=self.max_running or self.max_requests_per_batch,
        )
        self.driver.start(self.engine, self.telemetry, oracle=None)

    # --- the engine tells us what happened ------------------------------------------------------------------------

    def add_waiting_request(self, state: RequestState) -> None:
        super().add_waiting_request(state)
        rid = state.request_id
        if rid in self._finishing:  # finish + requeue in one go: the engine evicted it (offload or soft reset)
            self._requeued.append(rid)
        elif rid not in self._info:
            self._arrivals.append(state)

    def finish_request(self, request_id: str) -> None:
        state = self.active_requests.get(request_id)
        if request_id in self._running and state is not None:
            self._finishing[request_id] = compat.total_generated(state)
        super().finish_request(request_id)

    def clear_cancelled_requests(self) -> list[RequestState]:
        cancelled = super().clear_cancelled_requests()
        now = time.monotonic()
        for state in cancelled:
            rid = state.request_id
            info = self._info.pop(rid, None)
            if info is not None:
                del self._rid[info.id]
            if info is None:  # never reached the policy
                self._arrivals = [s for s in self._arrivals if s.request_id != rid]
            elif rid in self._running:
                self._running.discard(rid)
                self.driver.cancel(info, compat.total_generated(state), now)
            else:
                self.driver.cancel(info, None, now)
            self._charged.pop(rid, None)
            self.clients.forget(rid)
        return cancelled

    # --- scheduling -----------------------------------------------------------------------------------------------

    def schedule_batch(
        self, token_budget: int, cache_budget: int
    ) -> tuple[list[FutureRequestState] | None, bool, int, int]:
        now = time.monotonic()
        self._catch_up(now)
        token_budget, max_running = self.driver.limits(
            now, token_budget, self.max_running or self.max_requests_per_batch
        )
        running = list(self.active_requests.values())
        decoding = [s for s in running if s.status == RequestStatus.DECODING]
        prefilling = [s for s in running if s.status == RequestStatus.PREFILLING]
        candidates = itertools.chain(decoding, prefilling, self._admissions(now, max_running))
        leaving: set[str] = set()
        scheduled, one_failed, fast_path, num_q, max_kv = compat.process_candidates(
            self, candidates, token_budget, cache_budget, leaving
        )
        self._settle_offer(now)
        compat.cleanup_waiting_queue(self, leaving)
        self._order_victims()
        decodes = sum(1 for f in scheduled if f.query_length == 1 and f.state.status == RequestStatus.DECODING)
        context = sum(f.state.current_len() for f in scheduled)
        self._last_step = (now, num_q - decodes, decodes, context) if scheduled else None
        if not scheduled and one_failed:
            return None, fast_path, 0, 0
        return scheduled, fast_path, num_q, max_kv

    def _admissions(self, now: float, max_running: int) -> Iterator[RequestState]:
        """Waiting requests in the policy's order, one at a time, until one is not scheduled."""

        def room() -> bool:
            return not self.block_new_requests and len(self.active_requests) < max_running

        for info in self.driver.candidates(now, room):
            state = self.waiting_requests.get(self._rid.get(info.id, ""))
            if state is None:
                raise RuntimeError(f"the policy offered request {info.id}, which the engine does not have waiting")
            self._offer = (info, state)
            yield state
            if not self._settle_offer(now):  # it did not fit: admit nothing more this step
                return

    def _settle_offer(self, now: float) -> bool:
        """The request last offered left the waiting queue (it was scheduled): tell the policy. True if it did."""
        if self._offer is None:
            return False
        info, state = self._offer
        self._offer = None
        if state.request_id in self.waiting_requests:
            return False
        self.driver.admit(info, now)
        self._running.add(state.request_id)
        self._charged.setdefault(state.request_id, compat.total_generated(state))
        return True

    def _order_victims(self) -> None:
        """The engine evicts starved requests from the end of the list: put the policy's victims last."""
        remaining = [entry for entry in self.starved_requests if entry[0].request_id in self._info]
        others = [entry for entry in self.starved_requests if entry[0].request_id not in self._info]
        order = {rid: i for i, rid in enumerate(self.active_requests)}  # oldest first, as policies expect
        remaining.sort(key=lambda entry: order.get(entry[0].request_id, -1))
        victims = []
        while remaining:
            victim = self.driver.victim([self._info[s.request_id] for s, _ in remaining])
            victims.append(
                remaining.pop(next(i for i, (s, _) in enumerate(remaining) if self._info[s.request_id] is victim))
            )
        self.starved_requests = others + victims[::-1]

    # --- what happened since the last step, in the simulator's order ----------------------------------------------

    def _catch_up(self, now: float) -> None:
        step_s = self._measure_step(now)
        generated = {}
        for rid in self._running:
            state = self.active_requests.get(rid)
            total = self._finishing[rid] if rid in self._finishing else compat.total_generated(state) if state else None
            if total is not None and total > self._charged[rid]:
                generated[self._info[rid].id] = total - self._charged[rid]
                self._charged[rid] = total
        if generated:
            self.driver.step(generated, step_s, now)
        for rid in self._requeued:
            del self._finishing[rid]
            self._running.discard(rid)
            self.driver.preempt(self._info[rid], now)
        self._requeued.clear()
        for rid, total in self._finishing.items():
            self._running.discard(rid)
            info = self._info.pop(rid)
            del self._rid[info.id], self._charged[rid]
            self.driver.finish(info, total, now)
            self.clients.forget(rid)
        self._finishing.clear()
        for state in self._arrivals:
            client = self.clients.get(state.request_id)
            max_out = state.max_new_tokens if state.max_new_tokens is not None else None
            info = RequestInfo(
                next(self._ids),
                client.name,
                client.arrival if client.arrival is not None else now,
                len(state.initial_tokens),
                max_out,
                client.weight,
            )
            self._info[state.request_id], self._rid[info.id] = info, state.request_id
            self.driver.arrive(info, now)
        self._arrivals.clear()

    def _measure_step(self, now: float) -> float:
        """Seconds since the last scheduled batch began; kept as a step-time sample when the engine did not idle."""
        if self._last_step is None:
            return 0.0
        start, prefill, decodes, context = self._last_step
        step_s = now - start
        if self.active_requests or self._finishing:  # it ran without waiting for new requests
            self.samples.append((prefill, decodes, context, step_s))
            self.telemetry.report_estimate(now, 1.0)  # the engine was busy for the whole step
            if len(self.samples) % REFIT_EVERY == 0:
                self._refit()
        return step_s

    def _refit(self) -> None:
        """Fit the engine's step time to the measured steps and hand the policy the refined model."""
        try:
            fitted = EngineModel.fit(
                self.samples[-4 * REFIT_EVERY :],
                kv_tokens=self.engine.kv_tokens,
                max_step_tokens=self.engine.max_step_tokens,
                max_running=self.engine.max_running,
            )
        except ValueError:
            return
        self.engine = fitted
        self.driver.configure(self.engine, self.telemetry)


def policy_factory(policy: str | Callable[[], SchedulingPolicy]) -> Callable[[], SchedulingPolicy]:
    """A maker of fresh policy instances from a registered name or a factory (the engine restarts with a new one)."""
    return lambda: make_policy(policy)


def register_scheduler(
    policy: str | Callable[[], SchedulingPolicy],
    clients: ClientDirectory,
    telemetry: Telemetry | None = None,
    max_running: int | None = None,
    steps: list[tuple[int, int, int, float]] | None = None,
) -> str:
    """Add a `FairScheduler` for `policy` (a registered name or a factory of fresh instances) to transformers'
    SCHEDULER_MAPPING and return its `scheduler_type` name. steps: a list the scheduler appends its measured steps
    to (prefill tokens, decoding requests, context tokens, seconds)."""
    factory = policy_factory(policy)
    label = policy if isinstance(policy, str) else getattr(policy, "__name__", "custom")
    name = f"fairness-{label}-{id(clients):x}"
    compat.register_scheduler_class(
        name,
        functools.partial(
            FairScheduler, policy=factory, clients=clients, telemetry=telemetry, max_running=max_running, steps=steps
        ),
    )
    return name


def unregister_scheduler(name: str) -> None:
    """Remove what `register_scheduler` added (a `ServingEngine` does so when it stops)."""
    compat.unregister_scheduler_class(name)
