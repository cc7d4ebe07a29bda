"""Eviction policies for the expert residency cache: the order in which one set of slots gives up its experts.

A policy sees the keys resident in one slot set (`runtime.slots`) and yields them best victim first, lazily, so the
cache takes the first one it may evict (not protected, not being copied) in a step or two. Every policy is O(1)
Python steps per use (`touch`), per eviction (`forget`) and per victim yielded; `LayerAware` visits the layers that
share the set (a handful) before its first victim.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict
from collections.abc import Iterator

from offload_moe.runtime.types import ExpertKey


class EvictionPolicy:
    """Tracks uses of the keys resident in one slot set and yields them in eviction order. The cache makes one per
    set (a copy of a policy instance given as an option)."""

    def at_layer(self, layer: int, num_layers: int) -> None:
        """The model is now running MoE layer `layer` (policies that use the layer order override this)."""

    def touch(self, key: ExpertKey) -> None:
        """`key` is used now (resident, or just admitted)."""
        raise NotImplementedError

    def forget(self, key: ExpertKey) -> None:
        """`key` left the set."""
        raise NotImplementedError

    def victims(self) -> Iterator[ExpertKey]:
        """The resident keys, best victim first, lazily: the cache stops at the first it may evict, before it changes
        anything."""
        raise NotImplementedError


class LRU(EvictionPolicy):
    """Evict the least recently used key."""

    def __init__(self) -> None:
        self._order: OrderedDict[ExpertKey, None] = OrderedDict()  # least recently used first

    def touch(self, key: ExpertKey) -> None:
        if key in self._order:
            self._order.move_to_end(key)
        else:
            self._order[key] = None

    def forget(self, key: ExpertKey) -> None:
        self._order.pop(key, None)

    def victims(self) -> Iterator[ExpertKey]:
        return iter(self._order)


class LFU(EvictionPolicy):
    """Evict the least frequently used key (counts survive eviction); ties go to the least recently used. Keys sit in
    one recency-ordered bucket per use count; the distinct counts are kept sorted (bisect), so a use moves a key
    between two buckets in O(1) steps."""

    def __init__(self) -> None:
        self._count: dict[ExpertKey, int] = {}
        self._buckets: dict[int, OrderedDict[ExpertKey, None]] = {}  # count -> resident keys, least recent first
        self._counts: list[int] = []  # the counts that have a non-empty bucket, ascending

    def touch(self, key: ExpertKey) -> None:
        old = self._count.get(key, 0)
        if old and key in self._buckets.get(old, ()):
            self._leave(key, old)
        self._count[key] = old + 1
        bucket = self._buckets.get(old + 1)
        if bucket is None:
            bucket = self._buckets[old + 1] = OrderedDict()
            bisect.insort(self._counts, old + 1)
        bucket[key] = None

    def forget(self, key: ExpertKey) -> None:
        count = self._count.get(key, 0)
        if key in self._buckets.get(count, ()):
            self._leave(key, count)

    def _leave(self, key: ExpertKey, count: int) -> None:
        bucket = self._buckets[count]
        del bucket[key]
        if not bucket:
            del self._buckets[count]
            del self._counts[bisect.bisect_left(self._counts, count)]

    def victims(self) -> Iterator[ExpertKey]:
        for count in self._counts:  # the cache stops at its victim before it changes anything
            yield from self._buckets[count]


class LayerAware(EvictionPolicy):
    """Evict the expert whose layer runs furthest in the future, least recently used first among those.

    Layers run in a fixed cycle, so while layer L runs, layer L's experts are next needed one whole forward pass
    later and layer L+1's immediately: an approximation of Belady's optimal policy that plain LRU gets backwards
    (LRU evicts layer L+1's experts, the oldest, just before they are needed).
    """

    def __init__(self) -> None:
        self._by_layer: dict[int, OrderedDict[ExpertKey, None]] = {}  # layer -> its resident keys, least recent first
        self._layer, self._num_layers = 0, 1

    def at_layer(self, layer: int, num_layers: int) -> None:
        self._layer, self._num_layers = layer, num_layers

    def touch(self, key: ExpertKey) -> None:
        keys = self._by_layer.setdefault(key[0], OrderedDict())
        keys[key] = None
        keys.move_to_end(key)

    def forget(self, key: ExpertKey) -> None:
        keys = self._by_layer.get(key[0])
        if keys is not None:
            keys.pop(key, None)
            if not keys:
                del self._by_layer[key[0]]

    def victims(self) -> Iterator[ExpertKey]:
        def distance(layer: int) -> int:  # 0: runs next
            return (layer - self._layer - 1) % self._num_layers

        for layer in sorted(self._by_layer, key=distance, reverse=True):
            yield from self._by_layer[layer]


EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRU, "lfu": LFU, "layer": LayerAware}
