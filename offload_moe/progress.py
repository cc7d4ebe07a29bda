"""Progress bars on long work (loading a checkpoint, warming the cache, calibrating): tqdm on a terminal, nothing
otherwise, so logs and CI stay quiet. tqdm comes with transformers, so it adds no dependency."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator, Sized
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
MIN_ITEMS = 8  # fewer steps than this finish too soon for a bar to help


def progress(items: Iterable[T], desc: str, total: int | None = None, unit: str = "it") -> Iterator[T]:
    """`items`, with a bar on stderr when it is a terminal and there are at least MIN_ITEMS of them."""
    if total is None and isinstance(items, Sized):
        total = len(items)
    quiet = not sys.stderr.isatty() or (total is not None and total < MIN_ITEMS)
    return iter(tqdm(items, desc=desc, total=total, unit=unit, disable=quiet, leave=False))
