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
        size = size_bytes(budget, "budget")
        if size <= 0:
            raise ValueError(f"budget={budget!r} must be positive")
        return size
    raise TypeError(f"budget must be a fraction in (0, 1] or a size string such as '6GiB', got {type(budget).__name__}")


def size_bytes(text: str, name: str) -> int:
    """A size such as "6GiB", "512MB" or "1e9" in bytes; `name` is the option's, for the error."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([a-zA-Z]*)\s*", text)
    if m is None or m.group(2).lower() not in _UNITS:
        raise ValueError(f"{name}={text!r} is not a size; write it like '6GiB', '512MiB', '2GB' or '1e9'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    raise AssertionError("unreachable")


def free_device_bytes(device: torch.device) -> int | None:
    """Bytes free on `device` now: CUDA's `mem_get_info`; on a CPU, `available_host_bytes()`; None where unknown."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return available_host_bytes() if device.type == "cpu" else None


def available_host_bytes() -> int | None:
    """RAM this process may still take: the kernel's MemAvailable, lowered to what its memory cgroup's limit leaves
    (v2 `memory.max`, v1 `memory.limit_in_bytes`; reclaimable page cache counts as free, as the kernel treats it).
    None where neither is known."""
    free = None
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                free = int(line.split()[1]) * 1024
    left = cgroup_left_bytes()
    if left is not None:
        free = left if free is None else min(free, left)
    return free


def cgroup_left_bytes(proc: Path = Path("/proc/self/cgroup"), root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """What this process's memory cgroup's limit leaves (limit - usage + inactive page cache), None without one.
    proc, root: where the process's cgroup line and the cgroup file systems are (tests point them elsewhere)."""
    with contextlib.suppress(OSError, ValueError):
        for line in proc.read_text().splitlines():
            _, controllers, path = line.split(":", 2)
            rel = path.lstrip("/")
            if controllers == "":  # v2: one hierarchy
                d = root / rel
                limit, usage, stat = d / "memory.max", d / "memory.current", d / "memory.stat"
                inactive = "inactive_file"
            elif "memory" in controllers.split(","):  # v1: the memory controller's hierarchy
                d = root / "memory" / rel
                limit, usage, stat = d / "memory.limit_in_bytes", d / "memory.usage_in_bytes", d / "memory.stat"
                inactive = "total_inactive_file"
            else:
                continue
            if not limit.exists():
                continue
            text = limit.read_text().strip()
            if text == "max" or int(text) >= 1 << 60:  # no limit (v1 writes a huge number)
                continue
            reclaimable = 0
            with contextlib.suppress(OSError, ValueError):
                for row in stat.read_text().splitlines():
                    key, value = row.split()
                    if key == inactive:
                        reclaimable = int(value)
            return max(0, int(text) - int(usage.read_text()) + reclaimable)
    return None
