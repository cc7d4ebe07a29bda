"""What a scheduler knows about a request when it arrives, as a feature vector for the MoPE predictors: the request
(input length, its output cap), its client's recent history, and the engine's load. Kept up to date from the same
events a scheduling policy receives, so training logs and the live scheduler compute features by one code path."""

from __future__ import annotations

import math
from collections import defaultdict, deque

import numpy as np

from fairness.core.request import RequestInfo

FEATURES = (
    "log_input_tokens",
    "log_max_output_tokens",  # 0 when the request sets no cap
    "has_max_output_tokens",
    "log_client_mean_output",  # mean of the client's last `history` finished requests (0 before any)
    "log_client_last_output",
    "log_client_finished",
    "log_client_mean_input",
    "log_global_mean_output",  # all clients' last 4 x `history` finished requests
    "log_waiting",  # requests queued at the scheduler
    "log_running",
    "log_running_context",  # KV tokens held by running requests
    "log_waiting_input",  # prompt tokens queued
)
TARGETS = ("output_tokens", "ttft_s", "e2e_s", "throughput_tok_s", "batch_util")


def _lg(x: float) -> float:
    return math.log1p(max(x, 0.0))


class LoadTracker:
    """Engine load and per-client history, fed by the policy protocol's events."""

    def __init__(self, history: int = 16):
        self._out: dict[str, deque[int]] = defaultdict(lambda: deque(maxlen=history))
        self._in: dict[str, deque[int]] = defaultdict(lambda: deque(maxlen=history))
        self._finished: dict[str, int] = defaultdict(int)
        self._global: deque[int] = deque(maxlen=4 * history)
        self._waiting: dict[int, int] = {}  # id -> prompt tokens
        self.context: dict[int, int] = {}  # running id -> KV tokens
        self._waiting_input = 0

    def features(self, req: RequestInfo) -> np.ndarray:
        """[F] float64 features of `req` now (call before `arrive`)."""
        outs, ins = self._out[req.client], self._in[req.client]
        cap = req.max_output_tokens or 0
        return np.array(
            [
                _lg(req.input_tokens),
                _lg(cap),
                float(cap > 0),
                _lg(sum(outs) / len(outs)) if outs else 0.0,
                _lg(outs[-1]) if outs else 0.0,
                _lg(self._finished[req.client]),
                _lg(sum(ins) / len(ins)) if ins else 0.0,
                _lg(sum(self._global) / len(self._global)) if self._global else 0.0,
                _lg(len(self._waiting)),
                _lg(len(self.context)),
                _lg(sum(self.context.values())),
                _lg(self._waiting_input),
            ]
        )

    def arrive(self, req: RequestInfo) -> None:
        self._waiting[req.id] = req.input_tokens
        self._waiting_input += req.input_tokens

    def admit(self, req: RequestInfo, context: int) -> None:
        self._waiting_input -= self._waiting.pop(req.id)
        self.context[req.id] = context

    def step(self, generated: dict[int, int]) -> None:
        for rid, n in generated.items():
            self.context[rid] += n

    def finish(self, req: RequestInfo, output_tokens: int) -> None:
        del self.context[req.id]
        self._out[req.client].append(output_tokens)
        self._in[req.client].append(req.input_tokens)
        self._global.append(output_tokens)
        self._finished[req.client] += 1

    def forget(self, client: str) -> None:
        """Drop `client`'s history (an idle client the scheduler forgets)."""
        for d in (self._out, self._in, self._finished):
            d.pop(client, None)

    def cancel(self, req: RequestInfo) -> None:
        """A waiting request left unserved."""
        self._waiting_input -= self._waiting.pop(req.id)

    def preempt(self, req: RequestInfo) -> None:
        """A running request goes back to the queue; on resumption it re-prefills its context."""
        ctx = self.context.pop(req.id)
        self._waiting[req.id] = ctx
        self._waiting_input += ctx
