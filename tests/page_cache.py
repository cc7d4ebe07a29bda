"""The page cache, seen and dropped for one file (no root needed): for the tests of reading checkpoints from disk,
and the lab's disk benches, which import them from here."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)


def cached_fraction(path: Path) -> float:
    """Share of `path`'s pages in the page cache now (mincore over a fresh read-only map; reads nothing)."""
    size = path.stat().st_size
    if size == 0:
        return 0.0
    page = mmap.PAGESIZE
    pages = (size + page - 1) // page
    with path.open("rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)  # private and writable (for ctypes), never written
        try:
            view = ctypes.c_char.from_buffer(m)
            vec = (ctypes.c_ubyte * pages)()
            failed = _libc.mincore(ctypes.c_void_p(ctypes.addressof(view)), ctypes.c_size_t(size), vec) != 0
            del view  # the map cannot close while ctypes holds its buffer
        finally:
            m.close()
    if failed:
        raise OSError(ctypes.get_errno(), f"mincore failed on {path}")
    resident = sum(v & 1 for v in vec)
    return resident / pages


def drop_cache(path: Path) -> None:
    """Write `path`'s dirty pages back, then release its pages from the page cache (no root needed)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)  # only clean pages can be released
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
