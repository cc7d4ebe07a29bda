"""The one object between an engine and a policy: every engine (the simulators, the served scheduler) reports what
happened through it, and it alone calls the policy's hooks, in the protocol's order, timing each call.

Engine-side protocol (the policy's own is in `fairness.core.policy`):
    driver.start(engine, telemetry, oracle)      # once; oracle: true output lengths (simulations only) or None
    driver.arrive(info, now)
    limits = driver.limits(now, max_step_tokens, max_running)
    for info in driver.candidates(now, has_room):  # the policy's next request while the engine has room ...
        if it does not fit: break                  # ... it stays queued at the policy
        driver.admit(info, now)                    # ... the engine took it
    driver.step(generated, step_s, now)
    victim = driver.victim(running); driver.preempt(victim, now)
    driver.finish(info, output_tokens, now[, input_tokens]) / driver.cancel(info, generated, now)
Observers (`EngineObserver`) see the same events, each in a fixed place relative to the policy's call.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from fairness.core.policy import SchedulingPolicy
from fairness.core.request import RequestInfo

if TYPE_CHECKING:
    from fairness.core.engine_model import EngineModel
    from fairness.core.telemetry import Telemetry


class EngineObserver:
    """Sees what the engine does, request by request (for logs and training data); every method is optional."""

    def on_start(self, engine: EngineModel, telemetry: Telemetry) -> None: ...

    def on_arrival(self, req: RequestInfo, now: float) -> None: ...

    def on_admit(self, req: RequestInfo, now: float) -> None: ...

    def on_step(self, generated: dict[int, int], step_s: float, now: float) -> None: ...

    def on_finish(self, req: RequestInfo, output_tokens: int, now: float) -> None: ...

    def on_preempt(self, req: RequestInfo, now: float) -> None: ...

    def on_cancel(self, req: RequestInfo, generated: int | None, now: float) -> None: ...

    def on_forget(self, client: str, now: float) -> None: ...


class OracleUnavailableError(ValueError):
    """An oracle policy (it reads true output lengths) was asked to run where they are not known: a live engine."""


def require_no_oracle(policy: SchedulingPolicy) -> None:
    """Refuse an oracle before a live engine starts: only a simulation knows a request's true output length."""
    if policy.needs_oracle:
        raise OracleUnavailableError(
            f"policy {policy.name!r} is an oracle: it reads every request's true output length, which only a "
            f"simulation knows; serve with 'vtc-pred' (predicted lengths) or 'vtc' instead"
        )


class PolicyDriver:
    """Calls `policy`'s hooks for an engine, times them (the scheduler's own overhead) and tells observers."""

    def __init__(self, policy: SchedulingPolicy, observers: Sequence[EngineObserver] = ()):
        self.policy = policy
        self.observers = list(observers)
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._admitted: RequestInfo | None = None  # the last request `admit` took (ends `candidates` otherwise)

    def _timed(self, hook: str, call: Callable, *args):
        t0 = time.perf_counter()
        try:
            return call(*args)
        finally:
            self.seconds[hook] += time.perf_counter() - t0
            self.calls[hook] += 1

    # --- the engine reports -----------------------------------------------------------------------------------------

    def start(self, engine: EngineModel, telemetry: Telemetry, oracle: dict[int, int] | None) -> None:
        """Before the first request. oracle: request id -> true output tokens; None where they are not known."""
        if self.policy.needs_oracle:
            if oracle is None:
                require_no_oracle(self.policy)
            self.policy.set_oracle(oracle)
        self.configure(engine, telemetry)
        for o in self.observers:
            o.on_start(engine, telemetry)

    def configure(self, engine: EngineModel, telemetry: Telemetry) -> None:
        """The engine's model changed (a served engine refits it from measured steps)."""
        self._timed("configure", self.policy.configure, engine, telemetry)

    def arrive(self, info: RequestInfo, now: float) -> None:
        for o in self.observers:
            o.on_arrival(info, now)
        self._timed("add_request", self.policy.add_request, info, now)

    def limits(self, now: float, max_step_tokens: int, max_running: int) -> tuple[int, int]:
        """This step's (token budget, running requests): the engine's maxima, lowered by the policy's limits."""
        limits = self._timed("batch_limits", self.policy.batch_limits, now)
        if limits is None:
            return max_step_tokens, max_running
        return max(1, min(max_step_tokens, int(limits[0]))), max(1, min(max_running, int(limits[1])))

    def candidates(self, now: float, has_room: Callable[[], bool]) -> Iterator[RequestInfo]:
        """The policy's next request, while `has_room()`; the engine `admit`s each it takes. The first one it does
        not take ends the admissions of this step (it stays queued at the policy)."""
        while has_room():
            info = self._timed("next_request", self.policy.next_request, now)
            if info is None:
                return
            self._admitted = None
            yield info
            if self._admitted is not info:
                return

    def admit(self, info: RequestInfo, now: float) -> None:
        self._timed("on_admit", self.policy.on_admit, info, now)
        self._admitted = info
        for o in self.observers:
            o.on_admit(info, now)

    def step(self, generated: dict[int, int], step_s: float, now: float) -> None:
        """Tokens each running request produced in the step that just ended."""
        for o in self.observers:
            o.on_step(generated, step_s, now)
        self._timed("on_step", self.policy.on_step, generated, step_s, now)

    def victim(self, running: list[RequestInfo]) -> RequestInfo:
        """Which of `running` (oldest first) to evict when KV runs out."""
        return self._timed("preemption_victim", self.policy.preemption_victim, running)

    def preempt(self, info: RequestInfo, now: float) -> None:
        for o in self.observers:
            o.on_preempt(info, now)
        self._timed("on_preempt", self.policy.on_preempt, info, now)

    def finish(self, info: RequestInfo, output_tokens: int, now: float, input_tokens: int | None = None) -> None:
        """`info` finished with `output_tokens`. input_tokens: the prompt's true length where the engine only
        estimated it at arrival (a gateway without the model's tokenizer): the policy settles with it."""
        if input_tokens is not None and input_tokens != info.input_tokens:
            info = replace(info, input_tokens=input_tokens)
        for o in self.observers:
            o.on_finish(info, output_tokens, now)
        self._timed("on_finish", self.policy.on_finish, info, output_tokens, now)

    def cancel(self, info: RequestInfo, generated: int | None, now: float) -> None:
        """The client left: `generated` tokens while running, or None if it was still waiting."""
        for o in self.observers:
            o.on_cancel(info, generated, now)
        self._timed("on_cancel", self.policy.on_cancel, info, generated, now)

    def forget(self, client: str, now: float) -> bool:
        """`client` is idle (nothing waiting or running): the policy and the observers drop what they keep of it.
        False where the policy must keep it for now (it is asked again later)."""
        if not self._timed("forget", self.policy.forget, client, now):
            return False
        for o in self.observers:
            o.on_forget(client, now)
        return True

    # --- measures ---------------------------------------------------------------------------------------------------

    def overhead_us(self) -> dict[str, float]:
        """Mean microseconds per scheduling decision (a next_request call, admitted or not), per arrival (add_request,
        which includes any prediction) and per engine step (on_step + batch_limits)."""

        def per(names: tuple[str, ...], count: str) -> float:
            return 1e6 * sum(self.seconds[n] for n in names) / max(self.calls[count], 1)

        return {
            "decision_us": per(("next_request",), "next_request"),
            "arrival_us": per(("add_request",), "add_request"),
            "step_us": per(("on_step", "batch_limits"), "on_step"),
        }
