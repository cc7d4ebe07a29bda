"""How much work an upstream engine gets at once: a fixed number, or one learned from its time to first token."""

from __future__ import annotations

import math


class ConcurrencyLimit:
    """Requests in flight on one upstream.

    Learned (Netflix's Gradient2 limiter, with time to first token as the round trip): a TTFT near the best recently
    seen means requests start at once, so the limit grows by sqrt(limit) while it is all in use; a TTFT above
    `tolerance` x that best means requests queue inside the engine, where the gateway's order no longer decides, so
    the limit shrinks in proportion. Fixed: `value` never changes.
    """

    def __init__(
        self,
        initial: int = 4,
        fixed: bool = False,
        minimum: int = 1,
        maximum: int = 256,
        tolerance: float = 2.0,
        smoothing: float = 0.2,
    ):
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError(f"need 1 <= minimum <= initial <= maximum, got {minimum}, {initial}, {maximum}")
        if tolerance < 1 or not 0 < smoothing <= 1:
            raise ValueError(f"need tolerance >= 1 and 0 < smoothing <= 1, got {tolerance}, {smoothing}")
        self.fixed, self.minimum, self.maximum = fixed, minimum, maximum
        self.tolerance, self.smoothing = tolerance, smoothing
        self._limit = float(initial)
        self._best: float | None = None  # the best TTFT seen, drifting slowly up to recent ones
        self._recent: float | None = None  # exponential average of recent TTFTs

    @property
    def value(self) -> int:
        return int(self._limit)

    def observe(self, ttft_s: float, in_flight: int) -> None:
        """One request's TTFT, with `in_flight` requests on the upstream when it started (itself included)."""
        if self.fixed:
            return
        ttft_s = max(ttft_s, 1e-6)
        self._best = ttft_s if self._best is None or ttft_s < self._best else self._best + 0.01 * (ttft_s - self._best)
        self._recent = ttft_s if self._recent is None else self._recent + 0.2 * (ttft_s - self._recent)
        gradient = max(0.5, min(1.0, self.tolerance * self._best / self._recent))
        if gradient >= 1.0 and in_flight < self.value:
            return  # not all in use: no evidence that more would start at once
        target = self._limit * gradient + (math.sqrt(self._limit) if gradient >= 1.0 else 0.0)
        self._limit += self.smoothing * (target - self._limit)
        self._limit = max(float(self.minimum), min(float(self.maximum), self._limit))
