"""Parse the expert budget a user gives `patch` (a fraction of the experts' bytes, or a byte size like "6GiB"), and
read what a device has free for it."""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import torch

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})


def budget_bytes(budget: float | int | str, total_expert_bytes: int) -> int:
    """Bytes of device memory the experts may use.

    A float in (0, 1] is a fraction of `total_expert_bytes`; a string such as "6GiB", "512MB" or "1e9" is a size.
    """
    if isinstance(budget, bool):
        raise TypeError("budget must be a fraction in (0, 1] or a size such as '6GiB', not a bool")
    if isinstance(budget, (int, float)):
        if not 0 < budget <= 1:
            raise ValueError(
                f"budget={budget!r} is not a fraction in (0, 1]; pass e.g. budget=0.25 for a quarter of the experts, "
                "or a size string such as budget='6GiB'"
            )
        return int(budget * total_expert_bytes)
    if isinstance(budget, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", budget)
        if m is None or m.group(2).lower() not in _UNITS:
            raise ValueError(f"budget={budget!r} is not a size; write it like '6GiB', '512MiB', '2GB' or '1e9'")
        size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
        if size <= 0:
            raise ValueError(f"budget={budget!r} must be positive")
        return size
    raise TypeError(f"budget must be a fraction in (0, 1] or a size string such as '6GiB', got {type(budget).__name__}")


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def free_device_bytes(device: torch.device) -> int | None:
    """Bytes free on `device` now: CUDA's `mem_get_info`; on a CPU, the kernel's MemAvailable, lowered to what the
    cgroup's `memory.max` leaves (containers); None where neither is known."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    free = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    with contextlib.suppress(OSError, ValueError):
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            left = int(limit) - int(Path("/sys/fs/cgroup/memory.current").read_text())
            free = left if free is None else min(free, left)
    return free
