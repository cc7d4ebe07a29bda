"""How much work an upstream engine gets at once: a fixed number, or one learned from what its throughput does as
work is added."""

from __future__ import annotations


class ConcurrencyLimit:
    """Requests in flight on one upstream.

    Learned, it grows only while growing pays. A window closes after `window_s` and at least `window_tokens` output
    tokens; when the upstream was saturated through it (every slot in use and requests waiting at the gateway, at 80%
    of its token arrivals), its token rate is compared with the last kept limit's. The limit grows by a quarter (at
    least one) and keeps a growth only if the requests it added brought at least `efficiency` of the token rate
    the kept ones bring on average; a growth that did not pay goes back, and the limit holds for `hold` windows
    before probing again. Past that point more work mostly queues inside the engine, first come first served and
    out of the gateway's order: an engine that batches every request (vLLM, SGLang, transformers' continuous
    batching) starts each at once, so its time to first token cannot say where that point is; its throughput can.
    Fixed: `value` never changes.
    """

    def __init__(
        self,
        initial: int = 4,
        fixed: bool = False,
        minimum: int = 1,
        maximum: int = 256,
        window_s: float = 1.0,
        window_tokens: int = 200,
        efficiency: float = 0.5,
        hold: int = 3,
    ):
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError(f"need 1 <= minimum <= initial <= maximum, got {minimum}, {initial}, {maximum}")
        if window_s <= 0 or window_tokens < 1 or efficiency < 0 or hold < 0:
            raise ValueError(
                f"need window_s > 0, window_tokens >= 1, efficiency >= 0 and hold >= 0, got {window_s}, "
                f"{window_tokens}, {efficiency}, {hold}"
            )
        self.fixed, self.minimum, self.maximum = fixed, minimum, maximum
        self.window_s, self.window_tokens, self.efficiency, self.hold = window_s, window_tokens, efficiency, hold
        self._limit = initial
        self._kept: tuple[int, float] | None = None  # (limit, token rate) of the last growth that paid
        self._holding = 0  # saturated windows to wait before probing a larger limit again
        self._start: float | None = None  # the open window: its start, tokens, token arrivals, saturated ones
        self._tokens = self._arrivals = self._full = 0

    @property
    def value(self) -> int:
        return self._limit

    def tokens(self, n: int, now: float, saturated: bool) -> None:
        """`n` output tokens came from the upstream at `now`; saturated: every slot in use and requests waiting."""
        if self.fixed:
            return
        if self._start is None:
            self._start, self._tokens, self._arrivals, self._full = now, 0, 0, 0
        self._tokens += n
        self._arrivals += 1
        self._full += saturated
        elapsed = now - self._start
        if elapsed < self.window_s or self._tokens < self.window_tokens:
            return
        self._start = None
        if self._full >= 0.8 * self._arrivals:
            self._climb(self._tokens / elapsed)

    def _climb(self, rate: float) -> None:
        """One saturated window's token rate at the current limit."""
        limit = self._limit
        if self._kept is None or limit <= self._kept[0]:  # at the kept limit: refresh its rate, probe when due
            self._kept = (limit, rate if self._kept is None else (rate + self._kept[1]) / 2)
            if self._holding:
                self._holding -= 1
            else:
                self._grow()
        elif rate / self._kept[1] - 1 >= self.efficiency * (limit / self._kept[0] - 1):  # it paid: keep, probe on
            self._kept = (limit, rate)
            self._grow()
        else:  # it did not: back to the kept limit, and stay there a while
            self._limit = self._kept[0]
            self._holding = self.hold

    def _grow(self) -> None:
        self._limit = min(self.maximum, self._limit + max(1, round(self._limit / 4)))
