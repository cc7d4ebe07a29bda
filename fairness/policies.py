"""Built-in scheduling policies: FCFS, RPM (per-client rate limit), VTC and VTC with output-length prediction.

VTC follows Sheng et al., "Fairness in Serving Large Language Models" (OSDI 2024): one virtual token counter per
client, charged w_p per input token at admission and w_q per output token as it is generated, divided by the
client's weight; the backlogged client with the smallest counter is served first; a client that (re)joins the
backlog is lifted to the smallest counter of the backlogged clients, so idle time banks no credit.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable

from .ledger import Ledger
from .policy import register_policy
from .request import RequestInfo


class FCFS:
    """First come, first served across all clients."""

    name = "fcfs"

    def __init__(self) -> None:
        self._queue: deque[RequestInfo] = deque()

    def add_request(self, req: RequestInfo, now: float) -> None:
        self._queue.append(req)

    def next_request(self, now: float) -> RequestInfo | None:
        return self._queue[0] if self._queue else None

    def on_admit(self, req: RequestInfo, now: float) -> None:
        self._queue.remove(req)

    def on_step(self, generated: dict[int, int], step_s: float, now: float) -> None:
        pass

    def on_finish(self, req: RequestInfo, output_tokens: int, now: float) -> None:
        pass

    def on_preempt(self, req: RequestInfo, now: float) -> None:
        self._queue.appendleft(req)  # resumes first, as in vLLM

    def preemption_victim(self, running: list[RequestInfo]) -> RequestInfo:
        return running[-1]  # the most recently admitted, as in vLLM


class RPM:
    """FCFS, but a client may start at most `rpm` requests in any 60-second window (requests-per-minute limit)."""

    name = "rpm"

    def __init__(self, rpm: int = 30) -> None:
        if rpm < 1:
            raise ValueError(f"rpm must be >= 1, got {rpm}")
        self.rpm = rpm
        self._queues: dict[str, deque[RequestInfo]] = defaultdict(deque)
        self._admitted: dict[str, deque[float]] = defaultdict(deque)
        self._resumed: set[int] = set()  # preempted requests do not count against the limit again

    def add_request(self, req: RequestInfo, now: float) -> None:
        self._queues[req.client].append(req)

    def _eligible(self, client: str, now: float) -> bool:
        if self._queues[client][0].id in self._resumed:
            return True
        window = self._admitted[client]
        while window and window[0] <= now - 60.0:
            window.popleft()
        return len(window) < self.rpm

    def next_request(self, now: float) -> RequestInfo | None:
        heads = [q[0] for c, q in self._queues.items() if q and self._eligible(c, now)]
        return min(heads, key=lambda r: (r.id not in self._resumed, r.arrival_s, r.id), default=None)

    def on_admit(self, req: RequestInfo, now: float) -> None:
        self._queues[req.client].remove(req)
        if req.id in self._resumed:
            self._resumed.discard(req.id)
        else:
            self._admitted[req.client].append(now)

    def on_step(self, generated: dict[int, int], step_s: float, now: float) -> None:
        pass

    def on_finish(self, req: RequestInfo, output_tokens: int, now: float) -> None:
        pass

    def on_preempt(self, req: RequestInfo, now: float) -> None:
        self._queues[req.client].appendleft(req)
        self._resumed.add(req.id)

    def preemption_victim(self, running: list[RequestInfo]) -> RequestInfo:
        return running[-1]


class VTC:
    """Virtual Token Counter (weighted). w_p, w_q: cost of an input and an output token."""

    name = "vtc"

    def __init__(self, w_p: float = 1.0, w_q: float = 2.0) -> None:
        self.w_p, self.w_q = w_p, w_q
        self.counters: dict[str, float] = defaultdict(float)
        self._queues: dict[str, deque[RequestInfo]] = defaultdict(deque)
        self._running: dict[int, RequestInfo] = {}
        self._resumed: set[int] = set()  # preempted, waiting to resume: admission is not charged again
        self._last_left: str | None = None  # client whose request last left the queue

    def backlogged(self) -> list[str]:
        return [c for c, q in self._queues.items() if q]

    def _lift(self, u: str) -> None:
        """u (re)joins the backlog: idle time banks no credit."""
        if self._queues[u]:
            return
        backlog = self.backlogged()
        if backlog:
            self.counters[u] = max(self.counters[u], min(self.counters[c] for c in backlog))
        elif self._last_left is not None:
            self.counters[u] = max(self.counters[u], self.counters[self._last_left])

    def add_request(self, req: RequestInfo, now: float) -> None:
        self._lift(req.client)
        self._queues[req.client].append(req)

    def next_request(self, now: float) -> RequestInfo | None:
        backlog = self.backlogged()
        if not backlog:
            return None
        client = min(backlog, key=lambda c: (self.counters[c], self._queues[c][0].arrival_s, c))
        return self._queues[client][0]

    def on_admit(self, req: RequestInfo, now: float) -> None:
        self._queues[req.client].remove(req)
        self._last_left = req.client
        self._running[req.id] = req
        if req.id in self._resumed:
            self._resumed.discard(req.id)
        else:
            self._charge_admission(req)

    def _charge_admission(self, req: RequestInfo) -> None:
        self.counters[req.client] += self.w_p * req.input_tokens / req.weight

    def on_step(self, generated: dict[int, int], step_s: float, now: float) -> None:
        for rid, n in generated.items():
            req = self._running[rid]
            self.counters[req.client] += self.w_q * n / req.weight

    def on_finish(self, req: RequestInfo, output_tokens: int, now: float) -> None:
        del self._running[req.id]

    def preemption_victim(self, running: list[RequestInfo]) -> RequestInfo:
        """The newest request of the most-served client: evicting the least-served client's request instead would
        starve it while the others' running requests keep generating (found by the 2U property test)."""
        newest_first = list(reversed(running))
        return max(newest_first, key=lambda r: self.counters[r.client])  # max() keeps the first (newest) of equals

    def on_preempt(self, req: RequestInfo, now: float) -> None:
        del self._running[req.id]
        self._lift(req.client)
        self._queues[req.client].appendleft(req)
        self._resumed.add(req.id)


class VTCPredicted(VTC):
    """VTC that charges a predicted output length at admission, then only tokens beyond it, and refunds the unused
    prediction at finish. `predict(req) -> tokens`; the default predicts each client's mean observed output length
    (an engine knows it from finished requests), falling back to `default_tokens`."""

    name = "vtc-pred"

    def __init__(
        self,
        w_p: float = 1.0,
        w_q: float = 2.0,
        predict: Callable[[RequestInfo], float] | None = None,
        default_tokens: float = 256.0,
    ) -> None:
        super().__init__(w_p, w_q)
        self.default_tokens = default_tokens
        self._predict = predict or self._client_mean
        self._history: dict[str, list[int]] = defaultdict(list)
        self._output = Ledger(self.counters)  # the output-token part of the counters

    def _client_mean(self, req: RequestInfo) -> float:
        seen = self._history[req.client][-32:]
        guess = sum(seen) / len(seen) if seen else self.default_tokens
        return min(guess, req.max_output_tokens) if req.max_output_tokens else guess

    def _charge_admission(self, req: RequestInfo) -> None:
        super()._charge_admission(req)
        self._output.admit(req.id, req.client, self.w_q * float(self._predict(req)) / req.weight)

    def on_step(self, generated: dict[int, int], step_s: float, now: float) -> None:
        for rid, n in generated.items():
            self._output.accrue(rid, self.w_q * n / self._running[rid].weight)  # charged beyond the prediction

    def on_finish(self, req: RequestInfo, output_tokens: int, now: float) -> None:
        self._output.settle(req.id)  # refunds the unused part of the prediction
        self._history[req.client].append(output_tokens)
        super().on_finish(req, output_tokens, now)


class VTCOracle(VTCPredicted):
    """ORACLE, for reference only: VTC-pred whose prediction is the true output length, which no engine knows.
    The simulator hands it the truth through `set_oracle`; every report labels it as an oracle."""

    name = "vtc-oracle"
    needs_oracle = True

    def __init__(self, w_p: float = 1.0, w_q: float = 2.0) -> None:
        super().__init__(w_p, w_q, predict=lambda req: self._truth[req.id])
        self._truth: dict[int, int] = {}

    def set_oracle(self, true_output_tokens: dict[int, int]) -> None:
        self._truth = true_output_tokens


register_policy("fcfs", FCFS)
register_policy("rpm", RPM)
register_policy("vtc", VTC)
register_policy("vtc-pred", VTCPredicted)
register_policy("vtc-oracle", VTCOracle)
