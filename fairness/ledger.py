"""A per-client counter charged with a prediction before a request runs and reconciled with its actual use: the
shared mechanism of VTC with prediction and of Equinox's two counters."""

from __future__ import annotations

from collections import defaultdict


class Ledger:
    """Per-client counter charged with a prediction at admission, reconciled with the actual use.

    After `settle`, a request has been charged exactly its actual amount, whatever was predicted.
    """

    def __init__(self, value: dict[str, float] | None = None) -> None:
        self.value: dict[str, float] = defaultdict(float) if value is None else value  # client -> counter
        self._client: dict[int, str] = {}
        self._predicted: dict[int, float] = {}
        self._actual: dict[int, float] = {}

    def admit(self, rid: int, client: str, predicted: float) -> None:
        self._client[rid], self._predicted[rid], self._actual[rid] = client, predicted, 0.0
        self.value[client] += predicted

    def accrue(self, rid: int, amount: float) -> None:
        """Actual use as it happens: only what goes beyond the prediction is charged now."""
        before = self._actual[rid]
        self._actual[rid] = before + amount
        self.value[self._client[rid]] += max(0.0, self._actual[rid] - max(before, self._predicted[rid]))

    def charged(self, rid: int) -> float:
        return max(self._predicted[rid], self._actual[rid])

    def settle(self, rid: int, actual: float | None = None) -> float:
        """The request is done: replace what was charged by `actual` (default: the accrued use). Returns it."""
        final = self._actual[rid] if actual is None else actual
        self.value[self._client[rid]] += final - self.charged(rid)
        for d in (self._client, self._predicted, self._actual):
            del d[rid]
        return final
