"""The scheduler plug-in API (in the spirit of vLLM's v1 scheduler): a policy orders waiting requests, the engine
decides what fits. Every hook an engine calls is declared here with its default, and engines call them all
unconditionally. Policies are found by name and users can register their own.

Call protocol:
    policy.configure(engine, telemetry)   # once, before the first request
    policy.add_request(info, now)         # each arrival
    policy.batch_limits(now)              # each step: (step tokens, running requests), or None for the engine's
    r = policy.next_request(now)          # which waiting request to admit next (None: admit nothing now)
    policy.on_admit(r, now)               # the engine admitted it (it fitted); repeat next_request/on_admit
    policy.on_step(generated, step_s, now) # tokens each running request produced this step, step duration
    policy.on_finish(info, output_tokens, now)
    policy.preemption_victim(running)     # KV ran out: which running request to evict (oldest first in `running`)
    policy.on_preempt(info, now)          # the engine evicted it: it waits again, and is re-admitted through
                                          # next_request/on_admit (already-charged work is not charged twice)
    policy.on_cancel(info, generated, now) # a serving engine: the client left (generated None: it was waiting)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import TYPE_CHECKING

from fairness.core.request import RequestInfo

if TYPE_CHECKING:
    from fairness.core.engine_model import EngineModel
    from fairness.core.telemetry import Telemetry


class SchedulingPolicy(ABC):
    """Base class of every policy: four methods to implement, the other hooks with their defaults."""

    name: str = "policy"
    needs_oracle: bool = False  # only a labelled oracle (for reference) is handed true output lengths

    def configure(self, engine: EngineModel, telemetry: Telemetry) -> None:  # noqa: B027 (optional hook)
        """Before the first request: the engine's capacity and step-time model, and GPU telemetry. A serving engine
        calls it again when it has refitted its step-time model from measured steps."""

    @abstractmethod
    def add_request(self, req: RequestInfo, now: float) -> None: ...

    @abstractmethod
    def next_request(self, now: float) -> RequestInfo | None: ...

    @abstractmethod
    def on_admit(self, req: RequestInfo, now: float) -> None: ...

    @abstractmethod
    def on_preempt(self, req: RequestInfo, now: float) -> None: ...

    def batch_limits(self, now: float) -> tuple[int, int] | None:
        """(step token budget, max running requests) for the next step; None: the engine's own maxima."""
        return None

    def on_step(self, generated: dict[int, int], step_s: float, now: float) -> None:  # noqa: B027 (optional hook)
        """Tokens each running request produced in the step that just ended, and its duration."""

    def on_finish(self, req: RequestInfo, output_tokens: int, now: float) -> None:  # noqa: B027 (optional hook)
        """`req` finished with `output_tokens`."""

    def preemption_victim(self, running: list[RequestInfo]) -> RequestInfo:
        """Which running request to evict when KV runs out (`running` is oldest first): the newest, as vLLM does."""
        return running[-1]

    def on_cancel(self, req: RequestInfo, generated: int | None, now: float) -> None:
        """The client left before `req` finished. generated: tokens it received while running, or None if it was
        still waiting (then it must leave the queue). Default: a running request is settled as finished."""
        if generated is None:
            raise NotImplementedError(f"policy {self.name!r} cannot drop a waiting request: implement on_cancel")
        self.on_finish(req, generated, now)

    def forget(self, client: str, now: float) -> bool:
        """`client` has nothing waiting or running and has been idle a while: drop what the policy keeps of it, so a
        stream of distinct client names does not grow it without bound (a long-running gateway). False: it must be
        kept (state that still constrains it). Default: the policy keeps nothing per client."""
        return True

    def set_oracle(self, true_output_tokens: dict[int, int]) -> None:
        """Oracles only (`needs_oracle = True`): every request's true output length, by request id."""
        raise TypeError(f"policy {self.name!r} is not an oracle; engines hand true lengths to oracles only")


_REGISTRY: dict[str, Callable[..., SchedulingPolicy]] = {}


def register_policy(name: str, factory: Callable[..., SchedulingPolicy]) -> None:
    """Make `make_policy(name, **kwargs)` call `factory(**kwargs)`. Re-registering a name replaces it."""
    _REGISTRY[name] = factory


def unregister_policy(name: str) -> None:
    """Remove a registered policy (a plug-in that is unloaded, a test's own policy)."""
    if name not in _REGISTRY:
        raise ValueError(f"no scheduling policy {name!r} is registered; registered: {sorted(_REGISTRY)}")
    del _REGISTRY[name]


def make_policy(name: str | SchedulingPolicy | Callable[..., SchedulingPolicy], **kwargs) -> SchedulingPolicy:
    """A policy instance: by registered name, from a factory of fresh instances (called with kwargs), or a ready
    instance (passes through)."""
    if isinstance(name, SchedulingPolicy):
        return name
    if callable(name):
        policy = name(**kwargs)
        if not isinstance(policy, SchedulingPolicy):
            raise TypeError(f"a policy factory must return a SchedulingPolicy, not {type(policy).__name__}")
        return policy
    if not isinstance(name, str):
        raise TypeError(f"a policy is a registered name, a factory or a SchedulingPolicy, not {type(name).__name__}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown scheduling policy {name!r}; registered: {sorted(_REGISTRY)}")
    return _REGISTRY[name](**kwargs)


def policy_names() -> list[str]:
    return sorted(_REGISTRY)
