"""Admission to the cache (TinyLFU-style): copying a missed expert is worth it only when it has been needed more often
than the expert the copy would evict; otherwise the eviction costs a later miss for an expert used less. `auto`
weighs it when it splits misses between the link and the host, and host-computed experts are copied in the
background only when admitted."""

from __future__ import annotations

from offload_moe.runtime.types import ExpertKey


class UseCounts:
    """How many layer calls needed each expert, and the admission test built on it."""

    def __init__(self, num_layers: int, num_experts: int):
        self._uses = [[0] * num_experts for _ in range(num_layers)]  # Python ints: a call counts a few at a time

    def used(self, layer: int, experts: list[int]) -> None:
        """A call of `layer` needed `experts` (distinct ids)."""
        uses = self._uses[layer]
        for e in experts:
            uses[e] += 1

    def admits(self, key: ExpertKey, victim: ExpertKey) -> bool:
        """A copy of `key` that evicts `victim` pays back: `key` was needed more often."""
        return self._uses[key[0]][key[1]] > self._uses[victim[0]][victim[1]]
