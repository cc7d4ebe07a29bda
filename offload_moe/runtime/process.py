"""What this process really uses, from Linux's /proc (None elsewhere): bytes read from storage, and resident memory
split into anonymous (the slot pool, host copies in RAM) and file-backed (memory-mapped checkpoints, libraries)."""

from __future__ import annotations


def storage_read_bytes() -> int | None:
    """Bytes this process caused to be read from storage so far (page-cache hits excluded; memory-map faults
    included): /proc/self/io `read_bytes`."""
    try:
        with open("/proc/self/io") as f:
            for line in f:
                if line.startswith("read_bytes:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def resident_memory() -> tuple[int, int] | None:
    """(anonymous, file-backed) resident bytes of this process now: /proc/self/status `RssAnon`, `RssFile`."""
    found: dict[str, int] = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key in ("RssAnon", "RssFile"):
                    found[key] = int(value.split()[0]) * 1024  # kB
    except OSError:
        return None
    if len(found) != 2:
        return None
    return found["RssAnon"], found["RssFile"]
