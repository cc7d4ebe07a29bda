"""Eviction policies for the expert residency cache. Keys are (layer, expert) pairs."""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Hashable, Iterable


class EvictionPolicy:
    """Tracks uses of resident keys and picks which one to evict among allowed candidates."""

    name = "base"

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


EVICTION_POLICIES: dict[str, type[EvictionPolicy]] = {"lru": LRU, "lfu": LFU}


def make_eviction(name: str | EvictionPolicy) -> EvictionPolicy:
    if isinstance(name, EvictionPolicy):
        return name
    if name not in EVICTION_POLICIES:
        raise ValueError(f"unknown eviction policy {name!r}; choose one of {sorted(EVICTION_POLICIES)}")
    return EVICTION_POLICIES[name]()
