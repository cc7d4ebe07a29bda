"""vLLM's v1 scheduler with its waiting queue ordered by a `fairness` policy (VTC, weighted VTC, VTC-pred, Equinox),
through the same `PolicyDriver` as the other engines:

    FAIRNESS_POLICY=vtc FAIRNESS_TENANTS=tenants.json \
        python -m vllm.entrypoints.openai.api_server --model M --scheduler-cls fairness.vllm.FairScheduler

vLLM keeps its own step loop: running requests first, then waiting ones while they fit. The queue it takes them from
is a `FairQueue`, which offers the policy's next request. A request is charged its prompt when vLLM takes it from the
queue, its output tokens after every step, and is settled at its finish (`FAIRNESS_CHARGE=uncached`: at its prompt
less the tokens the prefix cache served). A request vLLM puts back (preempted, or skipped for a step) returns to the
policy's queue keeping what it was charged. The tenant is `vllm_xargs={"tenant": ...}`, else `FAIRNESS_DEFAULT_TENANT`.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from fairness.core.driver import PolicyDriver, require_no_oracle
from fairness.core.engine_model import EngineModel
from fairness.core.policy import SchedulingPolicy, make_policy, policy_names
from fairness.core.request import RequestInfo
from fairness.core.telemetry import Telemetry
from fairness.serving.api import load_tenants
from fairness.vllm import compat
from fairness.vllm.compat import Request

CHARGES = ("prompt", "uncached")


@dataclass(frozen=True)
class Settings:
    """The plug-in's configuration, from the environment of the vLLM server (its `--scheduler-cls` takes no
    arguments). tenants: tenant name -> weight (default 1)."""

    policy: str = "vtc"
    tenants: Mapping[str, float] = field(default_factory=dict)
    charge: str = "prompt"
    default_tenant: str = "default"
    mope: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> Settings:
        """FAIRNESS_POLICY (default vtc), FAIRNESS_TENANTS (a tenants file, as the gateway's: {"<api key>": {"name":
        ..., "weight": ...}}), FAIRNESS_CHARGE (prompt | uncached), FAIRNESS_DEFAULT_TENANT, FAIRNESS_MOPE (a MoPE
        .onnx for equinox). Refuses bad values with a message naming the variable."""
        policy = env.get("FAIRNESS_POLICY", "vtc")
        if policy not in policy_names():
            raise ValueError(f"FAIRNESS_POLICY={policy!r} is not a policy; choose one of {policy_names()}")
        charge = env.get("FAIRNESS_CHARGE", "prompt")
        if charge not in CHARGES:
            raise ValueError(f"FAIRNESS_CHARGE={charge!r}: choose one of {list(CHARGES)}")
        tenants = load_weights(env["FAIRNESS_TENANTS"]) if env.get("FAIRNESS_TENANTS") else {}
        mope = env.get("FAIRNESS_MOPE") or None
        if mope is not None and not Path(mope).is_file():
            raise ValueError(f"FAIRNESS_MOPE={mope!r}: no such file (a MoPE .onnx, `python -m fairness.mope export`)")
        return cls(policy, tenants, charge, env.get("FAIRNESS_DEFAULT_TENANT", "default"), mope)

    def make_policy(self) -> SchedulingPolicy:
        if self.policy == "equinox" and self.mope is not None:
            from fairness.core.equinox import Equinox
            from fairness.core.predictor import OnnxPredictor

            return Equinox(predictor=OnnxPredictor(self.mope))
        return make_policy(self.policy)


def load_weights(path: str) -> dict[str, float]:
    """Tenant name -> weight from a tenants file (FAIRNESS_TENANTS), read as the gateway reads it."""
    try:
        return {t.name: t.weight for t in load_tenants(path).values()}
    except ValueError as e:
        raise ValueError(f"FAIRNESS_TENANTS={path!r}: {e}") from e


class FairQueue(compat.RequestQueue):
    """vLLM's waiting queue, in the policy's order: `peek_request` is the policy's next request, `pop_request` admits
    it; a request put back (`prepend_request`: preempted, or skipped for this step) goes back to the policy."""

    def __init__(self, driver: PolicyDriver, settings: Settings):
        self.driver, self.settings = driver, settings
        self._waiting: dict[str, Request] = {}  # request id -> request, in this queue
        self._info: dict[str, RequestInfo] = {}  # request id -> what the policy knows of it, until it ends
        self._requests: dict[int, Request] = {}  # the policy's id -> request
        self.admitted: dict[str, Request] = {}  # taken by the engine, not yet ended
        self._reported: dict[str, int] = {}  # request id -> output tokens the policy has been told of
        self._ids = itertools.count()

    # --- vLLM's RequestQueue --------------------------------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        """A new request reaches the policy; one the engine had taken returns to it, keeping its charge."""
        now = time.monotonic()
        rid = request.request_id
        self._waiting[rid] = request
        info = self._info.get(rid)
        if info is None:
            tenant = compat.tenant_of(request) or self.settings.default_tenant
            weight = self.settings.tenants.get(tenant, 1.0)
            info = RequestInfo(next(self._ids), tenant, now, request.num_prompt_tokens, request.max_tokens, weight)
            self._info[rid], self._requests[info.id] = info, request
            self.driver.arrive(info, now)
        elif self.admitted.pop(rid, None) is not None:
            self.driver.preempt(info, now)

    def prepend_request(self, request: Request) -> None:
        self.add_request(request)  # the policy orders it (VTC puts a preempted request first within its tenant)

    def prepend_requests(self, requests: Iterable[Request]) -> None:
        for request in requests:
            self.add_request(request)

    def peek_request(self) -> Request:
        info = self._next()
        if info is None:
            raise IndexError("peek from an empty queue")
        return self._requests[info.id]

    def pop_request(self) -> Request:
        """The policy's next request, admitted: vLLM takes it (to run, or to skip for this step)."""
        request = self.peek_request()
        rid = request.request_id
        self.driver.admit(self._info[rid], time.monotonic())
        del self._waiting[rid]
        self.admitted[rid] = request
        return request

    def remove_request(self, request: Request) -> None:
        self.remove_requests((request,))

    def remove_requests(self, requests: Iterable[Request]) -> None:
        """Aborted while waiting (or stopped while preempted): it leaves the policy as cancelled."""
        now = time.monotonic()
        for request in requests:
            if self._waiting.pop(request.request_id, None) is not None:
                self.driver.cancel(self._forget(request), None, now)

    def __bool__(self) -> bool:
        """Whether the policy offers a request now (a rate-limiting policy may hold back a non-empty queue)."""
        return bool(self._waiting) and self._next() is not None

    def __len__(self) -> int:
        return len(self._waiting)

    def __iter__(self) -> Iterator[Request]:
        return iter(list(self._waiting.values()))

    # --- the scheduler reports ------------------------------------------------------------------------------------

    def stepped(self, step_s: float, now: float) -> None:
        """A step ended: the policy learns the output tokens each admitted request produced, then the finishes."""
        generated, ended = {}, []
        for rid, request in self.admitted.items():
            total = compat.output_tokens(request)
            if total > self._reported.get(rid, 0):
                generated[self._info[rid].id] = total - self._reported.get(rid, 0)
                self._reported[rid] = total
            if request.is_finished():
                ended.append(request)
        if generated:
            self.driver.step(generated, step_s, now)
        for request in ended:
            self.finished(request, now)

    def finished(self, request: Request, now: float, cancelled: bool = False) -> None:
        """An admitted request ended: settled at its service (`FAIRNESS_CHARGE=uncached`: less its cached prompt)."""
        if self.admitted.pop(request.request_id, None) is None:
            return
        info = self._forget(request)
        out = compat.output_tokens(request)
        if cancelled:
            self.driver.cancel(info, out, now)
            return
        prompt = info.input_tokens - (compat.cached_tokens(request) if self.settings.charge == "uncached" else 0)
        self.driver.finish(info, out, now, input_tokens=prompt)

    def _forget(self, request: Request) -> RequestInfo:
        self._reported.pop(request.request_id, None)
        info = self._info.pop(request.request_id)
        del self._requests[info.id]
        return info

    def _next(self) -> RequestInfo | None:
        return next(self.driver.candidates(time.monotonic(), lambda: True), None)


class FairnessMixin:
    """What `FairScheduler` adds to vLLM's scheduler: the `FairQueue` as its waiting queue, and the policy told of
    every step's tokens and every finish."""

    def __init__(self, *args, **kwargs) -> None:
        compat.check_version()
        settings = Settings.from_env()  # refused before the engine allocates anything
        policy = settings.make_policy()
        require_no_oracle(policy)
        super().__init__(*args, **kwargs)
        kv_tokens, step_tokens, running = compat.capacity(self)
        self.driver = PolicyDriver(policy)
        engine = EngineModel(kv_tokens=max(1, kv_tokens), max_step_tokens=step_tokens, max_running=running)
        self.driver.start(engine, Telemetry(), oracle=None)
        self.waiting = FairQueue(self.driver, settings)
        self._last_step = time.monotonic()

    def update_from_output(self, scheduler_output, model_runner_output):
        outputs = super().update_from_output(scheduler_output, model_runner_output)
        now = time.monotonic()
        self.waiting.stepped(now - self._last_step, now)
        self._last_step = now
        return outputs

    def finish_requests(self, request_ids, finished_status):
        """Aborted from outside (a client left): running ones are charged what they generated."""
        done = super().finish_requests(request_ids, finished_status)
        now = time.monotonic()
        for request in done:
            self.waiting.finished(request, now, cancelled=True)
        return done


class FairScheduler(FairnessMixin, compat.Scheduler):
    """`--scheduler-cls fairness.vllm.FairScheduler`: vLLM's scheduler with a fairness policy's waiting order."""


class FairAsyncScheduler(FairnessMixin, compat.AsyncScheduler):
    """`--scheduler-cls fairness.vllm.FairAsyncScheduler`: the same on vLLM's async scheduler (`--async-scheduling`)."""
