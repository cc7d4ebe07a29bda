"""Eviction policies for the expert residency cache. Keys are (layer, expert) pairs."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable


class EvictionPolicy:
    """Tracks uses of resident keys and picks which one to evict among allowed candidates."""

    name = "base"

    def at_layer(self, layer: int, num_layers: int) -> None:
        """The model is now running MoE layer `layer` (policies that use the layer order override this)."""

    def touch(self, key: Hashable) -> None:
        raise NotImplementedError

    def forget(self, key: Hashable) -> None:
        raise NotImplementedError

    def victim(self, candidates: Iterable[Hashable]) -> Hashable | None:
        raise NotImplementedError


class LRU(EvictionPolicy):
    """Evict the least recently used key."""

    name = "lru"

    def __init__(self) -> None:
        self._order: OrderedDict[Hashable, None] = OrderedDict()

    def touch(self, key: Hashable) -> None:
        self._order[key] = None
        self._order.move_to_end(key)

    def forget(self, key: Hashable) -> None:
        self._order.pop(key, None)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable | None:
        return next(iter(self.oldest_first(candidates)), None)

    def oldest_first(self, candidates: Iterable[Hashable]) -> list[Hashable]:
        allowed = set(candidates)
        return [k for k in self._order if k in allowed]


class LFU(EvictionPolicy):
    """Evict the least frequently used key (counts survive eviction); ties go to the least recently used."""

    name = "lfu"

    def __init__(self) -> None:
        self._count: Counter[Hashable] = Counter()
        self._lru = LRU()

    def touch(self, key: Hashable) -> None:
        self._count[key] += 1
        self._lru.touch(key)

    def forget(self, key: Hashable) -> None:
        self._lru.forget(key)

    def victim(self, candidates: Iterable[Hashable]) -> Hashable | None:
        ranked = self._lru.oldest_first(candidates)  # min() keeps the first of equals: ties go to the oldest
        return min(ranked, key=lambda k: self._count[k], default=None)


class LayerAware(LRU):
    """Evict the expert whose layer runs furthest in the future, least recently used first among those.

    Layers run in a fixed cycle, so while layer L runs, layer L's experts are next needed one whole forward pass
    later and layer L+1's immediately: an approximation of Belady's optimal policy that plain LRU gets backwards
    (LRU evicts layer L+1's experts, the oldest, just before they are needed).
    """

    name = "layer"

    def __init__(self) -> None:
        super().__init__()
        self._layer, self._num_layers = 0, 1

    def at_layer(self, layer: int, num_layers: int) -> None:
        self._layer, self._num_layers = layer, num_layers

    def victim(self, candidates: Iterable[Hashable]) -> Hashable | None:
        ranked = self.oldest_first(candidates)
        distance = lambda key: (key[0] - self._layer - 1) % self._num_layers  # noqa: E731  0: needed next
        return max(ranked, key=distance, default=None)  # max() keeps the first of equals: the oldest


EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRU, "lfu": LFU, "layer": LayerAware}


def make_eviction(name: str | EvictionPolicy) -> EvictionPolicy:
    if isinstance(name, EvictionPolicy):
        return name
    if name not in EVICTION_POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(EVICTION_POLICIES)}")
    return EVICTION_POLICIES[name]()
