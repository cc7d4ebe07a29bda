"""Built-in scheduling policies: FCFS, RPM (per-client rate limit), VTC, VTC with output-length prediction, and LCF.

VTC follows Sheng et al., "Fairness in Serving Large Language Models" (OSDI 2024): one virtual token counter per
client, charged w_p per input token at admission and w_q per output token as it is generated, divided by the
client's weight; the backlogged client with the smallest counter is served first; a client that (re)joins the
backlog is lifted to the smallest counter of the backlogged clients, so idle time banks no credit.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable

from fairness.core.ledger import Backlog, Ledger
from fairness.core.policy import SchedulingPolicy, register_policy
from fairness.core.request import RequestInfo
from fairness.core.service import W_P, W_Q, service

HISTORY = 32  # finished requests per client whose mean output length vtc-pred predicts


class FCFS(SchedulingPolicy):
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

    def on_preempt(self, req: RequestInfo, now: float) -> None:
        self._queue.appendleft(req)  # resumes first, as in vLLM

    def on_cancel(self, req: RequestInfo, generated: int | None, now: float) -> None:
        if generated is None:
            self._queue.remove(req)


class RPM(SchedulingPolicy):
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

    def on_preempt(self, req: RequestInfo, now: float) -> None:
        self._queues[req.client].appendleft(req)
        self._resumed.add(req.id)

    def on_cancel(self, req: RequestInfo, generated: int | None, now: float) -> None:
        if generated is None:
            self._queues[req.client].remove(req)
            self._resumed.discard(req.id)

    def forget(self, client: str, now: float) -> bool:
        window = self._admitted.get(client)
        if self._queues.get(client) or (window and window[-1] > now - 60.0):
            return False  # still limited by its last minute of starts
        self._queues.pop(client, None)
        self._admitted.pop(client, None)
        return True


class VTC(SchedulingPolicy):
    """Virtual Token Counter (weighted). w_p, w_q: cost of an input and an output token.

    The counter is a `Ledger`: admission charges the input (plus, in subclasses, a predicted output), generated
    tokens accrue beyond that, and finish settles the request at its actual service. A preempted request keeps what
    it was charged and is not charged again when it resumes.
    """

    name = "vtc"

    def __init__(self, w_p: float = W_P, w_q: float = W_Q, lift: bool = True) -> None:
        self.w_p, self.w_q = w_p, w_q
        self.counter = Ledger()
        self.backlog = Backlog(lift=lift)
        self._running: dict[int, RequestInfo] = {}

    def predicted_output(self, req: RequestInfo) -> float:
        """Output tokens charged at admission, before any is generated (plain VTC: none)."""
        return 0.0

    def add_request(self, req: RequestInfo, now: float) -> None:
        self.backlog.push(req, [self.counter])

    def next_request(self, now: float) -> RequestInfo | None:
        return self.backlog.pick_least(self.counter)

    def on_admit(self, req: RequestInfo, now: float) -> None:
        self.backlog.remove(req)
        self._running[req.id] = req
        if not self.counter.holds(req.id):  # a resumed request was charged at its first admission
            prompt = service(req.input_tokens, 0, req.weight, self.w_p, self.w_q)
            self.counter.admit(
                req.id, req.client, prompt + service(0, self.predicted_output(req), req.weight, self.w_p, self.w_q)
            )
            self.counter.accrue(req.id, prompt)

    def on_step(self, generated: dict[int, int], step_s: float, now: float) -> None:
        for rid, n in generated.items():
            self.counter.accrue(rid, service(0, n, self._running[rid].weight, self.w_p, self.w_q))

    def on_finish(self, req: RequestInfo, output_tokens: int, now: float) -> None:
        """Settle at the request's actual service (refunds an unused prediction; `req.input_tokens` may be the
        prompt's true length where the engine only estimated it at arrival)."""
        self.counter.settle(req.id, service(req.input_tokens, output_tokens, req.weight, self.w_p, self.w_q))
        del self._running[req.id]

    def preemption_victim(self, running: list[RequestInfo]) -> RequestInfo:
        """The newest request of the most-served client: evicting the least-served client's request instead would
        starve it while the others' running requests keep generating (found by the 2U property test)."""
        return max(reversed(running), key=lambda r: self.counter[r.client])  # max() keeps the first (newest)

    def on_preempt(self, req: RequestInfo, now: float) -> None:
        del self._running[req.id]
        self.backlog.push(req, [self.counter], front=True)

    def on_cancel(self, req: RequestInfo, generated: int | None, now: float) -> None:
        if generated is not None:
            self.on_finish(req, generated, now)  # charged what it received
        elif self.counter.holds(req.id):  # preempted, then cancelled while waiting to resume
            self.backlog.discard(req)
            self.counter.settle(req.id)
        else:
            self.backlog.discard(req)

    def forget(self, client: str, now: float) -> bool:
        if not self.backlog.forget(client):
            return False
        self.counter.forget(client)
        return True


class LCF(VTC):
    """Least counter first: VTC without the lift (the VTC paper's baseline), so a client that was idle catches up
    on the service it missed while the others wait."""

    name = "lcf"

    def __init__(self, w_p: float = W_P, w_q: float = W_Q) -> None:
        super().__init__(w_p, w_q, lift=False)


class VTCPredicted(VTC):
    """VTC that charges a predicted output length at admission, then only tokens beyond it, and refunds the unused
    prediction at finish. `predict(req) -> tokens`; the default predicts each client's mean observed output length
    (an engine knows it from finished requests), falling back to `default_tokens`."""

    name = "vtc-pred"

    def __init__(
        self,
        w_p: float = W_P,
        w_q: float = W_Q,
        predict: Callable[[RequestInfo], float] | None = None,
        default_tokens: float = 256.0,
    ) -> None:
        super().__init__(w_p, w_q)
        self.default_tokens = default_tokens
        self._predict = predict or self._client_mean
        self._history: dict[str, deque[int]] = defaultdict(lambda: deque(maxlen=HISTORY))

    def _client_mean(self, req: RequestInfo) -> float:
        seen = self._history[req.client]
        guess = sum(seen) / len(seen) if seen else self.default_tokens
        return min(guess, req.max_output_tokens) if req.max_output_tokens else guess

    def predicted_output(self, req: RequestInfo) -> float:
        return float(self._predict(req))

    def on_finish(self, req: RequestInfo, output_tokens: int, now: float) -> None:
        self._history[req.client].append(output_tokens)
        super().on_finish(req, output_tokens, now)

    def forget(self, client: str, now: float) -> bool:
        if not super().forget(client, now):
            return False
        self._history.pop(client, None)
        return True


class VTCOracle(VTCPredicted):
    """ORACLE, for reference only: VTC-pred whose prediction is the true output length, which no engine knows.
    Engines hand it the truth through `set_oracle`; every report labels it as an oracle."""

    name = "vtc-oracle"
    needs_oracle = True

    def __init__(self, w_p: float = W_P, w_q: float = W_Q) -> None:
        super().__init__(w_p, w_q, predict=lambda req: self._truth[req.id])
        self._truth: dict[int, int] = {}

    def set_oracle(self, true_output_tokens: dict[int, int]) -> None:
        self._truth = true_output_tokens


register_policy("fcfs", FCFS)
register_policy("rpm", RPM)
register_policy("vtc", VTC)
register_policy("lcf", LCF)
register_policy("vtc-pred", VTCPredicted)
register_policy("vtc-oracle", VTCOracle)
