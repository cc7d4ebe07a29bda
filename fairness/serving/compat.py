"""Every private part of transformers' continuous-batching scheduler that `FairScheduler` uses, in one place, each
failing with a clear message when the installed transformers no longer has it (tested with transformers 5.24)."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import transformers
from transformers.generation.continuous_batching.requests import RequestState
from transformers.generation.continuous_batching.scheduler import SCHEDULER_MAPPING, Scheduler

from hooks import versions
from hooks.versions import require_release

TESTED = "transformers 5.24"
require_release("transformers", transformers.__version__, "5.24", "serve")


def require(ok: bool, what: str) -> None:
    versions.require(ok, what, f"transformers {transformers.__version__}", "fairness.serving", TESTED)


def total_generated(state: RequestState) -> int:
    """Tokens generated for a request so far, including those folded into the prompt by a soft reset."""
    require(hasattr(state, "_true_initial_tokens"), "RequestState._true_initial_tokens")
    folded = len(state.initial_tokens) - state._true_initial_tokens if state._true_initial_tokens else 0
    return folded + len(state.generated_tokens)


def process_candidates(
    scheduler: Scheduler, candidates: Iterable, token_budget: int, cache_budget: int, leaving: set[str]
) -> tuple:
    """transformers' own loop that schedules candidates while the token and cache budgets allow:
    (scheduled, one_failed, fast_path, query tokens, max KV read)."""
    require(callable(getattr(scheduler, "_process_candidates", None)), "Scheduler._process_candidates")
    return scheduler._process_candidates(candidates, token_budget, cache_budget, leaving)


def cleanup_waiting_queue(scheduler: Scheduler, leaving: set[str]) -> None:
    """Remove the requests that were scheduled this step from the waiting queue."""
    require(callable(getattr(scheduler, "_cleanup_waiting_queue", None)), "Scheduler._cleanup_waiting_queue")
    scheduler._cleanup_waiting_queue(leaving)


def register_scheduler_class(name: str, factory: Callable[..., Scheduler]) -> None:
    """Make `ContinuousBatchingConfig(scheduler_type=name)` build schedulers with `factory`."""
    require(isinstance(SCHEDULER_MAPPING, dict), "continuous_batching.scheduler.SCHEDULER_MAPPING")
    SCHEDULER_MAPPING[name] = factory


def unregister_scheduler_class(name: str) -> None:
    SCHEDULER_MAPPING.pop(name, None)


def is_registered(name: str) -> bool:
    return name in SCHEDULER_MAPPING
