"""Per-client counters: `Ledger`, charged with a prediction before a request runs and reconciled with its actual use
(the mechanism of VTC, VTC with prediction and both of Equinox's counters), and `Backlog`, the per-client queues
with VTC's lift, shared by every counter-based policy."""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Callable, Iterable

from fairness.core.request import RequestInfo


class Ledger:
    """Per-client counter charged with a prediction at admission, reconciled with the actual use.

    After `settle`, a request has been charged exactly its actual amount, whatever was predicted.
    """

    def __init__(self) -> None:
        self._value: dict[str, float] = defaultdict(float)  # client -> counter
        self._client: dict[int, str] = {}
        self._predicted: dict[int, float] = {}
        self._actual: dict[int, float] = {}

    def __getitem__(self, client: str) -> float:
        return self._value[client]

    def values(self) -> dict[str, float]:
        """A copy of every client's counter."""
        return dict(self._value)

    def holds(self, rid: int) -> bool:
        """`rid` was admitted and is not settled yet."""
        return rid in self._client

    def admit(self, rid: int, client: str, predicted: float) -> None:
        self._client[rid], self._predicted[rid], self._actual[rid] = client, predicted, 0.0
        self._value[client] += predicted

    def accrue(self, rid: int, amount: float) -> None:
        """Actual use as it happens: only what goes beyond the prediction is charged now."""
        before = self._actual[rid]
        self._actual[rid] = before + amount
        self._value[self._client[rid]] += max(0.0, self._actual[rid] - max(before, self._predicted[rid]))

    def charged(self, rid: int) -> float:
        return max(self._predicted[rid], self._actual[rid])

    def settle(self, rid: int, actual: float | None = None) -> float:
        """The request is done: replace what was charged by `actual` (default: the accrued use). Returns it."""
        final = self._actual[rid] if actual is None else actual
        self._value[self._client[rid]] += final - self.charged(rid)
        for d in (self._client, self._predicted, self._actual):
            del d[rid]
        return final

    def lift(self, client: str, floor: float) -> None:
        """Raise `client`'s counter to at least `floor` (idle time banks no credit)."""
        self._value[client] = max(self._value[client], floor)

    def set(self, client: str, value: float) -> None:
        """Overwrite a counter (for tests and hand-computed examples)."""
        self._value[client] = value


class Backlog:
    """Per-client FIFO queues of waiting requests, with VTC's lift for counters of clients that (re)join.

    A client that joins the backlog has each counter lifted to the smallest among backlogged clients (or, with no
    backlog, to the counter of the client whose request last left the queue): its idle time banks no credit.
    lift=False keeps the counters as they are (LCF, the paper's baseline without the lift).
    """

    def __init__(self, lift: bool = True) -> None:
        self._queues: dict[str, deque[RequestInfo]] = defaultdict(deque)
        self._last_left: str | None = None
        self._lift = lift

    def clients(self) -> list[str]:
        """Every client seen so far."""
        return list(self._queues)

    def backlogged(self) -> list[str]:
        return [c for c, q in self._queues.items() if q]

    def push(self, req: RequestInfo, counters: Iterable[Ledger], front: bool = False) -> None:
        """Queue `req` (at the front: a preempted request resumes first within its client)."""
        if self._lift and not self._queues[req.client]:
            backlog = self.backlogged()
            for counter in counters:
                if backlog:
                    counter.lift(req.client, min(counter[c] for c in backlog))
                elif self._last_left is not None:
                    counter.lift(req.client, counter[self._last_left])
        (self._queues[req.client].appendleft if front else self._queues[req.client].append)(req)

    def pick(self, key: Callable[[str], float]) -> RequestInfo | None:
        """The oldest request of the backlogged client with the smallest `key` (ties: older head, then name)."""
        backlog = self.backlogged()
        if not backlog:
            return None
        client = min(backlog, key=lambda c: (key(c), self._queues[c][0].arrival_s, c))
        return self._queues[client][0]

    def remove(self, req: RequestInfo) -> None:
        """`req` leaves the queue (admitted)."""
        self._queues[req.client].remove(req)
        self._last_left = req.client

    def discard(self, req: RequestInfo) -> None:
        """`req` leaves the queue unserved (its client went away)."""
        self._queues[req.client].remove(req)
