"""A memory cgroup that counts the page cache, for a process started inside it: for the tests of sizing from what
a limit leaves, and the lab's disk bench, which imports it from here. Needs a writable cgroup file system (root)."""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path


class MemoryLimit:
    """A memory cgroup that counts the page cache (v1 `memory.limit_in_bytes` or v2 `memory.max`), or None where
    this machine does not let us make one."""

    def __init__(self, path: Path, version: int):
        self.path, self.version = path, version

    @classmethod
    def make(cls, limit: int) -> MemoryLimit | None:
        name = f"offload-moe-bench-{uuid.uuid4().hex[:8]}"
        for root, version, knob in ((Path("/sys/fs/cgroup/memory"), 1, "memory.limit_in_bytes"),
                                    (Path("/sys/fs/cgroup"), 2, "memory.max")):  # fmt: skip
            if version == 2 and "memory" not in _read(root / "cgroup.controllers"):
                continue
            try:
                (root / name).mkdir()
                (root / name / knob).write_text(str(limit))
            except OSError:
                continue
            return cls(root / name, version)
        return None

    def enter(self) -> None:
        """Move the calling process into the group (run in the child before exec)."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    def peak(self) -> int:
        return int(_read(self.path / ("memory.max_usage_in_bytes" if self.version == 1 else "memory.peak")) or 0)

    def close(self) -> None:
        for _ in range(50):  # the group can be removed once its last process has been reaped
            try:
                self.path.rmdir()
                return
            except OSError:
                time.sleep(0.1)


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""
