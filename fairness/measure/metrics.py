"""Fairness measures over a simulation: VTC's max pairwise service difference among backlogged clients and Jain's
index of service within time windows, plus percentiles."""

from __future__ import annotations

import math

import numpy as np


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (linear interpolation); NaN when there are no values."""
    return float(np.percentile(values, q)) if values else math.nan


def jain_index(x: np.ndarray) -> float:
    """(sum x)^2 / (n * sum x^2): 1 when all equal, 1/n when one gets everything."""
    x = np.asarray(x, dtype=float)
    sq = float((x * x).sum())
    return float(x.sum() ** 2 / (len(x) * sq)) if sq > 0 else 1.0


class FairnessTracker:
    """Accumulates each client's service and, after every engine step, the fairness state.

    max_diff: the largest |service_i - service_j| received since i and j last became jointly backlogged.
    worst_interval_diff: the same over ANY sub-interval in which both were backlogged throughout (what VTC's 2U
    theorem bounds): within each joint backlog, the range of service_i - service_j. Service is
    (w_p * input + w_q * output tokens) / weight.
    jain(): mean over windows of `window_s` of Jain's index of the service received in the window by the clients that
    were backlogged during the whole window (clients that want less than their share are not counted against it).
    """

    def __init__(self, clients: list[str], sample_every_s: float, window_s: float):
        self.clients = clients
        self._idx = {c: i for i, c in enumerate(clients)}
        n = len(clients)
        self.s = np.zeros(n)  # cumulative service
        self._base = np.zeros((n, n))  # base[i, j]: service of i when i and j last became jointly backlogged
        self._backlogged = np.zeros(n, dtype=bool)
        self.max_diff = 0.0
        self.worst_interval_diff = 0.0
        self._hi = np.zeros((n, n))  # within the current joint backlog: the largest and smallest s_i - s_j so far
        self._lo = np.zeros((n, n))
        self._sample_every, self._next_sample = sample_every_s, None
        self._times: list[float] = []
        self._samples: list[np.ndarray] = []
        self._window_s, self._window_start, self._window_s0 = window_s, None, np.zeros(n)
        self._window_mask = np.zeros(n, dtype=bool)
        self._jain: list[float] = []

    def serve(self, client: str, amount: float) -> None:
        self.s[self._idx[client]] += amount

    def observe(self, t: float, waiting: dict[str, int]) -> None:
        """Call after each step with the number of waiting requests per client."""
        mask = np.array([waiting[c] > 0 for c in self.clients])
        new = mask & ~self._backlogged
        now = self.s[:, None] - self.s[None, :]  # [C, C] s_i - s_j
        if new.any():
            self._base[new, :] = self.s[new, None]
            self._base[:, new] = self.s[:, None]
            self._hi[new, :], self._hi[:, new] = now[new, :], now[:, new]
            self._lo[new, :], self._lo[:, new] = now[new, :], now[:, new]
        self._backlogged = mask
        if mask.sum() >= 2:
            gained = self.s[:, None] - self._base  # [C, C] service of i since (i, j) became jointly backlogged
            diff = gained - gained.T
            both = mask[:, None] & mask  # [C, C]: jointly backlogged pairs
            self.max_diff = max(self.max_diff, float(diff[both].max()))
            np.maximum(self._hi, now, out=self._hi)
            np.minimum(self._lo, now, out=self._lo)
            self.worst_interval_diff = max(self.worst_interval_diff, float((self._hi - self._lo)[both].max()))
        self._window(t, mask)
        if self._next_sample is None:
            self._next_sample = t
        while t >= self._next_sample:
            self._times.append(self._next_sample)
            self._samples.append(self.s.copy())
            self._next_sample += self._sample_every

    def _window(self, t: float, mask: np.ndarray) -> None:
        if self._window_start is None:
            self._window_start, self._window_s0, self._window_mask = t, self.s.copy(), mask.copy()
            return
        self._window_mask &= mask
        if t - self._window_start >= self._window_s:
            got = (self.s - self._window_s0)[self._window_mask]
            if len(got) >= 2 and got.sum() > 0:
                self._jain.append(jain_index(got))
            self._window_start, self._window_s0, self._window_mask = t, self.s.copy(), mask.copy()

    def jain(self) -> float:
        """Mean windowed Jain's index; NaN when no window had two clients backlogged throughout."""
        return float(np.mean(self._jain)) if self._jain else math.nan

    def total(self, client: str) -> float:
        return float(self.s[self._idx[client]])

    def series(self) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        times = np.array(self._times)
        stacked = np.array(self._samples) if self._samples else np.zeros((0, len(self.clients)))
        return times, {c: stacked[:, i] for c, i in self._idx.items()}
