"""`python -m lab.disk_read [--gib 2] [--dir DIR] [--out bench-results]`: this machine's storage read bandwidth by the
paths an expert store can read through, each from a file whose page cache was dropped first, and what stays cached.

- `o_direct`: O_DIRECT reads of `--chunk-mib` into an aligned buffer (no page cache at all);
- `pread+dontneed`: buffered reads, each chunk's page cache released behind it (`posix_fadvise(DONTNEED)`);
- `mmap-copy`: a memory map copied out (what copying experts out of a memory-mapped checkpoint does);
- `page-cache`: the same buffered reads again with the file cached (the ceiling of a warm page cache).

The disk tier (issue 24) needs this: its `disk_read_gbps` and the choice between O_DIRECT and pread + DONTNEED. The
file is written with a repeated random block and removed afterwards. Writes bench-results/disk-read.json.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import platform
import tempfile
import time
from pathlib import Path

from tests.page_cache import cached_fraction, drop_cache

MIB = 1 << 20


def _fingerprint(digest, buf, n: int) -> None:
    """Feed each chunk's first and last 64 bytes to `digest`: enough to catch a wrong offset, cheap enough not to be
    what is timed (hashing every byte would cap every path at the hash's speed)."""
    view = memoryview(buf)
    digest.update(view[:64])
    digest.update(view[max(0, n - 64) : n])


def write_file(path: Path, nbytes: int, block_mib: int = 64) -> None:
    """`nbytes` of a repeated random block (incompressible enough for any storage layer), synced to disk."""
    block = os.urandom(block_mib * MIB)
    with path.open("wb") as f:
        left = nbytes
        while left > 0:
            f.write(block[: min(left, len(block))])
            left -= len(block)
        f.flush()
        os.fsync(f.fileno())


def read_o_direct(path: Path, chunk: int) -> tuple[int, str]:
    """(bytes read, fingerprint) with O_DIRECT into a page-aligned buffer."""
    buf = mmap.mmap(-1, chunk)  # anonymous maps are page-aligned, as O_DIRECT needs
    try:
        return _read_all(path, os.O_RDONLY | os.O_DIRECT, buf, dontneed=False)
    finally:
        buf.close()


def read_buffered(path: Path, chunk: int, dontneed: bool) -> tuple[int, str]:
    """(bytes read, fingerprint) with buffered reads; dontneed: release each chunk's page cache behind it."""
    return _read_all(path, os.O_RDONLY, bytearray(chunk), dontneed)


def _read_all(path: Path, flags: int, buf, dontneed: bool) -> tuple[int, str]:
    """Read `path` front to back into `buf`, one `len(buf)` chunk at a time: (bytes read, fingerprint)."""
    fd = os.open(path, flags)
    digest, total = hashlib.sha256(), 0
    try:
        while (n := os.preadv(fd, [buf], total)) > 0:
            _fingerprint(digest, buf, n)
            if dontneed:
                os.posix_fadvise(fd, total, n, os.POSIX_FADV_DONTNEED)
            total += n
    finally:
        os.close(fd)
    return total, digest.hexdigest()


def read_mmap_copy(path: Path, chunk: int) -> tuple[int, str]:
    """(bytes read, fingerprint) copying a read-only memory map out chunk by chunk."""
    size = path.stat().st_size
    buf, digest = bytearray(chunk), hashlib.sha256()
    with path.open("rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as m:
        for off in range(0, size, chunk):
            n = min(chunk, size - off)
            buf[:n] = m[off : off + n]
            _fingerprint(digest, buf, n)
    return size, digest.hexdigest()


def measure(path: Path, chunk: int) -> dict:
    """Every path from a dropped cache (the warm page cache last), with the cache left behind by each."""
    methods = {
        "o_direct": lambda: read_o_direct(path, chunk),
        "pread+dontneed": lambda: read_buffered(path, chunk, dontneed=True),
        "mmap-copy": lambda: read_mmap_copy(path, chunk),
    }
    out, digests = {}, set()
    for name, run in methods.items():
        drop_cache(path)
        before = cached_fraction(path)
        t0 = time.perf_counter()
        nbytes, digest = run()
        seconds = time.perf_counter() - t0
        digests.add(digest)
        out[name] = {"gbps": nbytes / seconds / 1e9, "seconds": seconds, "cached_before": before,
                     "cached_after": cached_fraction(path)}  # fmt: skip
    read_buffered(path, chunk, dontneed=False)  # warm the cache, then time a read from it
    t0 = time.perf_counter()
    nbytes, digest = read_buffered(path, chunk, dontneed=False)
    digests.add(digest)
    out["page-cache"] = {"gbps": nbytes / (time.perf_counter() - t0) / 1e9, "cached_before": 1.0,
                         "cached_after": cached_fraction(path)}  # fmt: skip
    if len(digests) != 1:
        raise RuntimeError(f"the read paths disagree on {path}'s contents: a storage or reading bug")
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gib", type=float, default=2.0, help="file size in GiB (default 2)")
    ap.add_argument("--chunk-mib", type=int, default=4, help="read size in MiB (default 4)")
    ap.add_argument("--dir", type=Path, default=None, help="where to write the file (default: the temp dir)")
    ap.add_argument("--out", type=Path, default=Path("bench-results"))
    args = ap.parse_args(argv)
    if args.gib <= 0 or args.chunk_mib <= 0:
        raise SystemExit("--gib and --chunk-mib must be positive")
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        path = Path(tmp) / "disk-read.bin"
        write_file(path, int(args.gib * (1 << 30)))
        runs = measure(path, args.chunk_mib * MIB)
    result = {"machine": f"{platform.machine()}, {os.cpu_count()} cpus", "file_bytes": int(args.gib * (1 << 30)),
              "chunk_bytes": args.chunk_mib * MIB, "dir": str(args.dir or tempfile.gettempdir()), "runs": runs,
              "disk_read_gbps": max(runs[m]["gbps"] for m in ("o_direct", "pread+dontneed"))}  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "disk-read.json").write_text(json.dumps(result, indent=1))
    for name, r in runs.items():
        print(
            f"{name:<16}{r['gbps']:>7.2f} GB/s   cached before {r['cached_before']:.2f}, after {r['cached_after']:.2f}"
        )
    print(f"wrote {args.out / 'disk-read.json'}")


if __name__ == "__main__":
    main()
