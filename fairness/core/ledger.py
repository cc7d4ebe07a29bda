"""Per-client counters: `Ledger`, charged with a prediction before a request runs and reconciled with its actual use
(the mechanism of VTC, VTC with prediction and both of Equinox's counters), and `Backlog`, the per-client queues
with VTC's lift, shared by every counter-based policy."""

from __future__ import annotations

import heapq
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
        self._lowered: set[str] = set()  # clients whose counter went down since `lowered()` was last called

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
        before, predicted = self._actual[rid], self._predicted[rid]
        after = self._actual[rid] = before + amount
        charged = predicted if predicted > before else before  # max(before, predicted): branches cost less than max()
        if after > charged:  # called per request and engine step: the schedulers' most frequent call
            self._value[self._client[rid]] += after - charged

    def charged(self, rid: int) -> float:
        return max(self._predicted[rid], self._actual[rid])

    def settle(self, rid: int, actual: float | None = None) -> float:
        """The request is done: replace what was charged by `actual` (default: the accrued use). Returns it."""
        final = self._actual[rid] if actual is None else actual
        if final < self.charged(rid):
            self._lowered.add(self._client[rid])
        self._value[self._client[rid]] += final - self.charged(rid)
        for d in (self._client, self._predicted, self._actual):
            del d[rid]
        return final

    def lift(self, client: str, floor: float) -> None:
        """Raise `client`'s counter to at least `floor` (idle time banks no credit)."""
        self._value[client] = max(self._value[client], floor)

    def set(self, client: str, value: float) -> None:
        """Overwrite a counter (for tests and hand-computed examples)."""
        self._lowered.add(client)
        self._value[client] = value

    def forget(self, client: str) -> None:
        """Drop `client`'s counter (it holds no request): if it comes back, VTC's lift gives it a fair start."""
        if client in self._client.values():
            raise ValueError(f"client {client!r} still holds a request; only an idle client can be forgotten")
        self._value.pop(client, None)
        self._lowered.discard(client)

    def lowered(self) -> set[str]:
        """The clients whose counter went down since the last call (an index over the counters re-keys them)."""
        out, self._lowered = self._lowered, set()
        return out


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
        # pick_least's index: a heap of (counter, head arrival, client), each key a lower bound of the client's
        # current one; _key holds the one live entry per client (older entries are dropped when they surface)
        self._heap: list[tuple[float, float, str]] = []
        self._key: dict[str, tuple[float, float, str]] = {}
        self._touched: set[str] = set()  # joined, or got an older head: their key may have gone down

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
        if front or not self._queues[req.client]:
            self._touched.add(req.client)
        (self._queues[req.client].appendleft if front else self._queues[req.client].append)(req)

    def pick(self, key: Callable[[str], float]) -> RequestInfo | None:
        """The oldest request of the backlogged client with the smallest `key` (ties: older head, then name)."""
        backlog = self.backlogged()
        if not backlog:
            return None
        client = min(backlog, key=lambda c: (key(c), self._queues[c][0].arrival_s, c))
        return self._queues[client][0]

    def pick_least(self, counter: Ledger) -> RequestInfo | None:
        """`pick(lambda c: counter[c])` in O(log n) per change instead of a scan of every backlogged client: the same
        request, ties broken the same way (counter, head arrival, client)."""
        for c in self._touched | counter.lowered():
            self._index(c, counter)
        self._touched.clear()
        while self._heap:
            top = self._heap[0]
            c = top[2]
            q = self._queues[c]
            if not q or self._key.get(c) != top:  # left the backlog, or an older entry of a re-keyed client
                heapq.heappop(self._heap)
                if not q and self._key.get(c) == top:
                    del self._key[c]
                continue
            if (counter[c], q[0].arrival_s, c) == top:
                return q[0]
            heapq.heappop(self._heap)
            self._index(c, counter)  # its key went up since: re-key it
        return None

    def _index(self, client: str, counter: Ledger) -> None:
        q = self._queues[client]
        if q:
            self._key[client] = key = (counter[client], q[0].arrival_s, client)
            heapq.heappush(self._heap, key)

    def remove(self, req: RequestInfo) -> None:
        """`req` leaves the queue (admitted)."""
        self._queues[req.client].remove(req)
        self._last_left = req.client

    def forget(self, client: str) -> bool:
        """Drop `client`'s empty queue; False (kept) for the client whose request last left the queue, whose
        counter lifts the next client to join an empty backlog, or for a client with requests waiting."""
        if self._queues.get(client) or client == self._last_left:
            return False
        self._queues.pop(client, None)
        self._key.pop(client, None)
        self._touched.discard(client)
        return True

    def discard(self, req: RequestInfo) -> None:
        """`req` leaves the queue unserved (its client went away)."""
        self._queues[req.client].remove(req)
