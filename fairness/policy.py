"""The scheduler plug-in API (in the spirit of vLLM's v1 scheduler): a policy orders waiting requests, the engine
decides what fits. Policies are found by name and users can register their own.

Call protocol, per engine step:
    policy.add_request(info, now)         # each arrival
    r = policy.next_request(now)          # which waiting request to admit next (None: admit nothing now)
    policy.on_admit(r, now)               # the engine admitted it (it fitted); repeat next_request/on_admit
    policy.on_step(generated, step_s, now) # tokens each running request produced this step, step duration
    policy.on_finish(info, output_tokens, now)
    policy.preemption_victim(running)     # KV ran out: which running request to evict (oldest first in `running`)
    policy.on_preempt(info, now)          # the engine evicted a running request: it waits again, and is
                                          # re-admitted through next_request/on_admit (already-charged work is
                                          # not charged twice)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from .request import RequestInfo


class SchedulingPolicy(Protocol):
    name: str

    def add_request(self, req: RequestInfo, now: float) -> None: ...

    def next_request(self, now: float) -> RequestInfo | None: ...

    def on_admit(self, req: RequestInfo, now: float) -> None: ...

    def on_step(self, generated: dict[int, int], step_s: float, now: float) -> None: ...

    def on_finish(self, req: RequestInfo, output_tokens: int, now: float) -> None: ...

    def preemption_victim(self, running: list[RequestInfo]) -> RequestInfo: ...

    def on_preempt(self, req: RequestInfo, now: float) -> None: ...


_REGISTRY: dict[str, Callable[..., SchedulingPolicy]] = {}


def register_policy(name: str, factory: Callable[..., SchedulingPolicy]) -> None:
    """Make `make_policy(name, **kwargs)` call `factory(**kwargs)`. Re-registering a name replaces it."""
    _REGISTRY[name] = factory


def make_policy(name: str | SchedulingPolicy, **kwargs) -> SchedulingPolicy:
    """A policy instance by registered name (a ready instance passes through)."""
    if not isinstance(name, str):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"unknown scheduling policy {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def policy_names() -> list[str]:
    return sorted(_REGISTRY)
