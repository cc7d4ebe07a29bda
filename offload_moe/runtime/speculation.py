"""Whether speculative copies pay: copies nobody waits for yet, from three sources, judged per source and layer.

A copy paid if its expert was needed after it landed and before the expert it evicted was needed again; one evicted
unused, still in flight when needed, or whose victim was needed first cost a miss for nothing. A source whose copies
at a layer do not pay stops copying there, and its suggestions are only judged (would a copy started then have
landed in time?), so it comes back at no cost when it would pay again (a faster link, another phase of the
workload). Copies of host-computed experts are judged by admission instead (`runtime.admission`): by landing
before use they back off at layers with little reuse and leave the cache as a long prefill left it.
"""

from __future__ import annotations

import enum
import time
from collections.abc import Callable

from offload_moe.runtime.counters import Counters
from offload_moe.runtime.types import ExpertKey

PAY_PRECISION = 0.5  # a source keeps copying at a layer while at least half its copies there pay
PAYOFF_DECAY = 0.9  # weight of the past in the exponential average of paid copies
JUDGE_EVERY = 8  # a source that does not pay at a layer has its suggestions computed and judged at one call in 8


class Source(enum.Enum):
    """Who asked for a speculative copy."""

    LOOKAHEAD = "lookahead"  # the router-lookahead prefetcher: the next layers' predicted experts
    STANDIN = "standin"  # experts a stand-in served: copied for the next tokens, in idle link time
    HOST = "host"  # experts computed on the host: copied when admitted, in idle link time, unless copies take the cores


JUDGED_BY_ADMISSION = frozenset({Source.HOST})


class Payoff:
    """Whether one source's copies pay at one layer: an exponential average of paid copies, starting at the threshold
    (a source must pay from its first copies on)."""

    def __init__(self) -> None:
        self.precision, self.calls = PAY_PRECISION, 0

    def outcome(self, paid: bool) -> None:
        self.precision = PAYOFF_DECAY * self.precision + (1 - PAYOFF_DECAY) * float(paid)

    def allows(self) -> bool:
        return self.precision >= PAY_PRECISION

    def wants(self) -> bool:
        """Whether a suggestion is worth computing now: always while the source pays, else one call in JUDGE_EVERY
        (enough to notice when it would pay again, without paying for a prediction at every call)."""
        if self.allows():
            return True
        self.calls += 1
        return self.calls % JUDGE_EVERY == 0


class Speculation:
    """The pay-off of every source at every layer, and the copies and suggestions still to be judged. The cache tells
    it when a speculative copy starts, when experts are needed and when one is evicted.

    copy_seconds: the link's measured time per copy (None before any), to judge suggestions that were not copied.
    """

    def __init__(self, num_layers: int, counters: Counters, copy_seconds: Callable[[], float | None]):
        self._counters, self._copy_seconds = counters, copy_seconds
        self._payoff: dict[tuple[Source, int], Payoff] = {}
        self._copies: dict[ExpertKey, Source] = {}  # copied speculatively, not yet needed
        self._victim_of: dict[ExpertKey, ExpertKey] = {}  # such a copy -> the expert it evicted
        self._copy_of: dict[ExpertKey, ExpertKey] = {}  # ... and back: a victim -> the copy racing it
        self._judged: list[dict[int, tuple[Source, float]]] = [{} for _ in range(num_layers)]  # suggested, not copied

    def payoff(self, source: Source, layer: int) -> Payoff:
        payoff = self._payoff.get((source, layer))
        if payoff is None:
            payoff = self._payoff[(source, layer)] = Payoff()
        return payoff

    def allows(self, source: Source, layer: int) -> bool:
        """Whether `source` may copy at `layer` now."""
        return source in JUDGED_BY_ADMISSION or self.payoff(source, layer).allows()

    def wants(self, source: Source, layer: int) -> bool:
        """Whether `source` should compute its suggestions for `layer` now (predictions cost compute too)."""
        return self.payoff(source, layer).wants()

    def judge_later(self, source: Source, keys: list[ExpertKey]) -> None:
        """`source` suggested these absent experts but may not copy: judge them when their layer runs next."""
        now = time.perf_counter()
        for layer, expert in keys:
            self._judged[layer].setdefault(expert, (source, now))
        self._counters.speculation_skipped += 1

    def copied(self, key: ExpertKey, source: Source, victim: ExpertKey | None) -> None:
        """A speculative copy of `key` started, evicting `victim` (None: into a free slot)."""
        self._copies[key] = source
        if victim is not None and source not in JUDGED_BY_ADMISSION:
            self._victim_of[key] = victim
            self._copy_of[victim] = key
        if source is Source.LOOKAHEAD:
            self._counters.prefetches += 1
        else:
            self._counters.background_copies += 1

    def needed(self, layer: int, keys: list[ExpertKey], landed: Callable[[ExpertKey], bool]) -> None:
        """`layer` runs and needs `keys`: settle its judged suggestions, the copies racing these keys as victims, and
        the speculative copies of these keys (paid if `landed`)."""
        judged = self._judged[layer]
        if judged:
            copy_s, now = self._copy_seconds() or 0.0, time.perf_counter()
            needed = {e for _, e in keys}
            for expert, (source, when) in judged.items():
                self.payoff(source, layer).outcome(expert in needed and now - when >= copy_s)
            judged.clear()
        if not self._copies:  # nothing speculative in flight or unused: nothing to settle
            return
        for key in keys:
            copy = self._copy_of.pop(key, None)
            if copy is not None and copy not in keys and copy in self._copies:  # its victim was needed first
                self._victim_of.pop(copy, None)
                self.payoff(self._copies.pop(copy), copy[0]).outcome(False)
        for key in keys:
            source = self._copies.pop(key, None)
            victim = self._victim_of.pop(key, None)
            if victim is not None:
                self._copy_of.pop(victim, None)
            if source is None:
                continue
            in_time = landed(key)  # one still in flight still stalls, or goes to the host
            self.payoff(source, layer).outcome(in_time)
            if in_time and source is Source.LOOKAHEAD:
                self._counters.prefetches_used += 1
            elif in_time:
                self._counters.background_used += 1

    def evicted(self, key: ExpertKey) -> None:
        """`key` left the cache; a speculative copy of it evicted unused did not pay."""
        victim = self._victim_of.pop(key, None)
        if victim is not None:
            self._copy_of.pop(victim, None)
        source = self._copies.pop(key, None)
        if source is not None:
            self.payoff(source, key[0]).outcome(False)
