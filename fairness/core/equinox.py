"""Equinox: holistic fairness from two counters per client, charged with MoPE predictions before a request runs and
reconciled with what it really used, plus adaptive batching.

Our formulation (the paper's exact formulas are not public; see README "Equinox formulas"):

- UFC_c (User Fairness Counter), per request r of client c with weight w_c:
      ufc(r) = (w_p * input + w_q * output) / w_c * f(r),  f(r) = 1 - gamma + gamma * min(1, slo(r) / e2e(r)),
      slo(r) = ttft_slo_s + tpot_slo_s * output.
  Service that reached the user late counts for less, so a client whose requests ran late is served sooner.
- RFC_c (Resource Fairness Counter): GPU-seconds spent on c's requests: prompt tokens x the engine's prefill cost
  at admission, then per step, the engine model's decode time of the step x GPU utilisation (telemetry), split by
  each decoding request's own cost (per-sequence + per-context-token time); without an engine model, step_s split
  evenly.
- Both are charged at admission with the prediction (MoPE's output tokens and e2e latency; GPU-seconds per token
  observed so far), accrue only what exceeds the prediction as steps run, and are set to the actual at finish.
- H_c = alpha * UFC_c / mean(UFC) + (1 - alpha) * RFC_c / mean(RFC) over the clients seen so far; the backlogged
  client with the smallest H_c is served first (FIFO within a client), and a client that (re)joins the backlog has
  each counter lifted to the smallest among backlogged clients (VTC's lift: idle time banks no credit).
- Adaptive batching (when the engine is known through `configure`): a request is admitted only while the running
  requests' predicted KV footprint (prompt + max(predicted output, generated)) fits kappa x the KV pool; kappa is
  additive-increase, multiplicative-decrease: +kappa_growth per request that finishes, x kappa_backoff per
  preemption, within [0.5, max_kappa]. The per-step token budget is the largest
  prefill that keeps the engine model's step time within `step_slo_s` (never under `min_chunk` tokens, so prefill
  always progresses; decodes are never stalled).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from fairness.core.engine_model import EngineModel
from fairness.core.features import TARGETS, LoadTracker
from fairness.core.ledger import Backlog, Ledger
from fairness.core.policy import SchedulingPolicy, register_policy
from fairness.core.predictor import HistoryPredictor, OnnxPredictor, Predictor
from fairness.core.request import RequestInfo
from fairness.core.service import W_P, W_Q, service
from fairness.core.telemetry import Telemetry

_OUT, _E2E = TARGETS.index("output_tokens"), TARGETS.index("e2e_s")


def holistic(ufc: Mapping[str, float], rfc: Mapping[str, float], clients: list[str], alpha: float) -> dict[str, float]:
    """H_c = alpha * UFC_c / mean(UFC) + (1 - alpha) * RFC_c / mean(RFC), means over `clients` (a term is 0 while
    its mean is 0; a client without a counter yet has 0)."""
    u = {c: ufc.get(c, 0.0) for c in clients}
    r = {c: rfc.get(c, 0.0) for c in clients}
    mu = sum(u.values()) / len(clients) if clients else 0.0
    mr = sum(r.values()) / len(clients) if clients else 0.0
    return {c: alpha * (u[c] / mu if mu > 0 else 0.0) + (1 - alpha) * (r[c] / mr if mr > 0 else 0.0) for c in clients}


class Equinox(SchedulingPolicy):
    """The Equinox scheduling policy (see the module docstring for the formulas).

    predictor: a MoPE (`OnnxPredictor` or a path to its .onnx file); default: `HistoryPredictor` (client means).
    alpha: weight of the user counter in H. gamma: how much late service is discounted in UFC (0: pure tokens).
    """

    name = "equinox"

    def __init__(
        self,
        predictor: Predictor | str | Path | None = None,
        alpha: float = 0.5,
        w_p: float = W_P,
        w_q: float = W_Q,
        gamma: float = 0.1,
        ttft_slo_s: float = 2.0,
        tpot_slo_s: float = 0.1,
        adaptive: bool = True,
        step_slo_s: float = 0.3,
        min_chunk: int = 256,
        max_kappa: float = 2.0,
        kappa_growth: float = 0.03,
        kappa_backoff: float = 0.9,
    ) -> None:
        if not 0 <= alpha <= 1 or not 0 <= gamma <= 1:
            raise ValueError(f"alpha and gamma must be in [0, 1], got alpha={alpha}, gamma={gamma}")
        if ttft_slo_s <= 0 or tpot_slo_s <= 0 or step_slo_s <= 0 or min_chunk < 1:
            raise ValueError("ttft_slo_s, tpot_slo_s and step_slo_s must be > 0 and min_chunk >= 1")
        if max_kappa < 0.5 or kappa_growth < 0 or not 0 < kappa_backoff <= 1:
            raise ValueError("need max_kappa >= 0.5, kappa_growth >= 0 and 0 < kappa_backoff <= 1")
        if isinstance(predictor, str | Path):
            predictor = OnnxPredictor(predictor)
        if predictor is not None and not callable(getattr(predictor, "predict", None)):
            raise TypeError(f"predictor must have predict(features) -> predictions, got {type(predictor).__name__}")
        self.predictor: Predictor = predictor or HistoryPredictor()
        self.w_p, self.w_q = w_p, w_q
        self.alpha, self.gamma, self.ttft_slo_s, self.tpot_slo_s = alpha, gamma, ttft_slo_s, tpot_slo_s
        self.adaptive, self.step_slo_s, self.min_chunk = adaptive, step_slo_s, min_chunk
        self.max_kappa, self.kappa_growth, self.kappa_backoff = max_kappa, kappa_growth, kappa_backoff
        self.ufc, self.rfc = Ledger(), Ledger()
        self.backlog = Backlog()
        self._running: dict[int, RequestInfo] = {}
        self.load = LoadTracker()
        self.predicted: dict[int, np.ndarray] = {}  # id -> [T] MoPE prediction at arrival
        self._generated: dict[int, int] = defaultdict(int)
        self._first_admit: dict[int, float] = {}
        self.engine: EngineModel | None = None
        self.telemetry: Telemetry | None = None
        self.kappa = 1.0  # KV overcommit of the predicted footprint
        self._footprint = 0.0  # sum of _predicted_kv over running requests
        self.gpu_s_per_token = 0.0  # running estimate of a decode token's GPU-seconds (from telemetry)

    # --- engine, telemetry and adaptive batching -----------------------------------------------------------------

    def configure(self, engine: EngineModel, telemetry: Telemetry) -> None:
        self.engine, self.telemetry = engine, telemetry

    def batch_limits(self, now: float) -> tuple[int, int] | None:
        """(step token budget, max running requests) for the next step."""
        e = self.engine
        if e is None or not self.adaptive:
            return None
        decoding = len(self.load.context)
        base = e.step_seconds(0, decoding, sum(self.load.context.values()))
        prefill = int((self.step_slo_s - base) / e.prefill_s_per_token) if e.prefill_s_per_token > 0 else 1 << 30
        return max(self.min_chunk + decoding, prefill + decoding), e.max_running

    def _fits(self, req: RequestInfo) -> bool:
        """Whether the predicted KV footprint of the running batch plus `req` fits kappa x the pool."""
        if self.engine is None or not self.adaptive or not self.load.context:
            return True
        return self._footprint + self._predicted_kv(req.id, req.input_tokens) <= self.kappa * self.engine.kv_tokens

    def _predicted_kv(self, rid: int, prompt: int) -> float:
        """KV tokens the request will hold at its end: prompt + max(predicted output, generated so far)."""
        return prompt + max(self.predicted[rid][_OUT], self._generated[rid])

    # --- the policy protocol -------------------------------------------------------------------------------------

    def add_request(self, req: RequestInfo, now: float) -> None:
        pred = np.asarray(self.predictor.predict(self.load.features(req)[None, :]), dtype=np.float64)
        if pred.shape != (1, len(TARGETS)):
            raise ValueError(f"the predictor returned shape {pred.shape} for one request; expected (1, {len(TARGETS)})")
        pred = pred[0]  # [T]
        out = pred[_OUT] if np.isfinite(pred[_OUT]) else 256.0
        pred[_OUT] = min(max(out, 1.0), req.max_output_tokens or out)
        self.predicted[req.id] = pred
        self.load.arrive(req)
        self.backlog.push(req, (self.ufc, self.rfc))

    def scores(self) -> dict[str, float]:
        """H_c of every client seen so far."""
        return holistic(self.ufc.values(), self.rfc.values(), self.backlog.clients(), self.alpha)

    def next_request(self, now: float) -> RequestInfo | None:
        if not self.backlog.backlogged():
            return None
        h = self.scores()
        head = self.backlog.pick(lambda c: h[c])
        return head if self._fits(head) else None

    def on_admit(self, req: RequestInfo, now: float) -> None:
        self.load.admit(req, req.input_tokens + self._generated[req.id])
        self._footprint += self._predicted_kv(req.id, req.input_tokens)
        self._first_admit.setdefault(req.id, now)
        self.backlog.remove(req)
        self._running[req.id] = req
        if not self.ufc.holds(req.id):  # a resumed request was charged at its first admission
            self._charge_admission(req)

    def _latency_factor(self, e2e_s: float, output_tokens: float) -> float:
        slo = self.ttft_slo_s + self.tpot_slo_s * output_tokens
        return 1.0 - self.gamma + self.gamma * min(1.0, slo / max(e2e_s, 1e-9))

    def _charge_admission(self, req: RequestInfo) -> None:
        """First admission: charge both counters with the predicted use."""
        pred = self.predicted[req.id]
        out = pred[_OUT]
        waited = self._first_admit[req.id] - req.arrival_s
        e2e = pred[_E2E] if np.isfinite(pred[_E2E]) else 0.0
        e2e = max(e2e, waited + self.tpot_slo_s * out)  # at least what it already waited, then decoding at the SLO
        tokens = service(req.input_tokens, out, req.weight, self.w_p, self.w_q)
        self.ufc.admit(req.id, req.client, tokens * self._latency_factor(e2e, out))
        self.ufc.accrue(req.id, service(req.input_tokens, 0, req.weight, self.w_p, self.w_q))
        prefill_gpu_s = req.input_tokens * (self.engine.prefill_s_per_token if self.engine else 0.0)
        self.rfc.admit(req.id, req.client, (prefill_gpu_s + out * self.gpu_s_per_token) / req.weight)
        self.rfc.accrue(req.id, prefill_gpu_s / req.weight)

    def on_step(self, generated: dict[int, int], step_s: float, now: float) -> None:
        self.load.step(generated)
        shares = self._gpu_shares(generated, step_s)
        if shares:
            per_token = sum(shares.values()) / max(sum(generated.values()), 1)
            self.gpu_s_per_token += 0.05 * (per_token - self.gpu_s_per_token)
        for rid, n in generated.items():
            req, out = self._running[rid], self.predicted[rid][_OUT]
            before = self._generated[rid]
            self._generated[rid] = before + n
            self._footprint += max(before + n, out) - max(before, out)
            self.ufc.accrue(rid, service(0, n, req.weight, self.w_p, self.w_q))
            self.rfc.accrue(rid, shares[rid] / req.weight)

    def _gpu_shares(self, generated: dict[int, int], step_s: float) -> dict[int, float]:
        """GPU-seconds of this step's decoding per request: the engine model's decode time of the step (prefill was
        charged at admission), split by each request's own decode cost (its context length), times the GPU
        utilisation from telemetry. Without an engine model: step_s split evenly."""
        sample = self.telemetry.latest() if self.telemetry else None
        util = sample.gpu_util if sample is not None else 1.0
        e = self.engine
        if e is None:
            return {rid: step_s * util / len(generated) for rid in generated}
        cost = {rid: e.decode_s_per_seq + e.decode_s_per_ctx_token * self.load.context[rid] for rid in generated}
        total = sum(cost.values())
        decode_s = min(step_s, e.step_seconds(0, len(generated), sum(self.load.context[r] for r in generated)))
        return {rid: decode_s * util * (c / total if total > 0 else 1 / len(cost)) for rid, c in cost.items()}

    def on_finish(self, req: RequestInfo, output_tokens: int, now: float) -> None:
        self.kappa = min(self.max_kappa, self.kappa + self.kappa_growth)  # it fitted: admit a little more
        self._footprint -= self._predicted_kv(req.id, self._running[req.id].input_tokens)  # as admitted
        e2e = now - req.arrival_s
        tokens = service(req.input_tokens, output_tokens, req.weight, self.w_p, self.w_q)
        self.ufc.settle(req.id, tokens * self._latency_factor(e2e, output_tokens))
        self.rfc.settle(req.id)
        self.load.finish(req, output_tokens)
        for d in (self.predicted, self._generated, self._first_admit, self._running):
            d.pop(req.id, None)

    def preemption_victim(self, running: list[RequestInfo]) -> RequestInfo:
        """The newest request of the client with the largest H (VTC's rule, on the holistic score)."""
        h = self.scores()
        return max(reversed(running), key=lambda r: h[r.client])

    def on_cancel(self, req: RequestInfo, generated: int | None, now: float) -> None:
        if generated is not None:
            self.on_finish(req, generated, now)
            return
        self.backlog.discard(req)
        if self.ufc.holds(req.id):  # preempted, then cancelled while waiting to resume
            self.ufc.settle(req.id)
            self.rfc.settle(req.id)
        self.load.cancel(req)
        for d in (self.predicted, self._generated, self._first_admit):
            d.pop(req.id, None)

    def forget(self, client: str, now: float) -> bool:
        if not self.backlog.forget(client):
            return False
        self.ufc.forget(client)
        self.rfc.forget(client)
        self.load.forget(client)
        return True

    def on_preempt(self, req: RequestInfo, now: float) -> None:
        self._footprint -= self._predicted_kv(req.id, req.input_tokens)
        self.load.preempt(req)
        self.kappa = max(0.5, self.kappa * self.kappa_backoff)
        del self._running[req.id]
        self.backlog.push(req, (self.ufc, self.rfc), front=True)


register_policy("equinox", Equinox)
