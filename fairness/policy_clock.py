"""The policy's own time: every hook call through the clock is timed, for the scheduler-overhead measures."""

from __future__ import annotations

import time
from collections import defaultdict
from typing import Any

from .policy import SchedulingPolicy


class PolicyClock:
    """Calls the policy and adds up the time each hook takes (the scheduler's own overhead)."""

    def __init__(self, policy: SchedulingPolicy):
        self.policy = policy
        self.seconds: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)

    def __call__(self, hook: str, *args: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return getattr(self.policy, hook)(*args)
        finally:
            self.seconds[hook] += time.perf_counter() - t0
            self.calls[hook] += 1

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
