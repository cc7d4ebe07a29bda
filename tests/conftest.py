"""Fixtures shared by the suite; helpers that tests import live in tests/helpers.py."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

# Before torch loads MKL: on some CPUs (seen: AMD EPYC with AVX2) MKL's float32 GEMM results depend on the operands'
# memory alignment, so the same expert rows computed at another offset differ in the last bit. The exact-equality
# tests need MKL's conditional numerical reproducibility; a user who needs bit-identical outputs sets the same.
os.environ.setdefault("MKL_CBWR", "AUTO,STRICT")

import pytest  # noqa: E402

import offload_moe  # noqa: E402
from tests.helpers import FINE_MODEL_DIR, REFERENCE_MODEL_DIR

# measured host costs are cached per machine; the tests keep theirs to themselves, removed when the run ends
if "OFFLOAD_MOE_CACHE_DIR" not in os.environ:
    _HOST_COSTS = tempfile.TemporaryDirectory(prefix="offload-moe-test-cache-")
    os.environ["OFFLOAD_MOE_CACHE_DIR"] = _HOST_COSTS.name


def _model_dir(path: Path) -> Path:
    if not (path / "model.safetensors").exists():
        pytest.fail(f"reference model missing at {path}; run `make reference-model`")
    return path


@pytest.fixture(scope="session")
def reference_dir():
    return _model_dir(REFERENCE_MODEL_DIR)


@pytest.fixture(scope="session")
def fine_dir():
    return _model_dir(FINE_MODEL_DIR)


def _unpatched_at_teardown(open_):
    """Wraps patch or load: every handle it returns is unpatched when the test ends, passed or failed (no leaked
    workers), unless the test unpatched it itself."""
    handles = []

    def call(*args, **kwargs):
        out = open_(*args, **kwargs)
        handles.append(out[1] if isinstance(out, tuple) else out)
        return out

    yield call
    for h in handles:
        if h.patched:
            h.unpatch()


@pytest.fixture
def patched():
    """`offload_moe.patch`, unpatched at teardown."""
    yield from _unpatched_at_teardown(offload_moe.patch)


@pytest.fixture
def loaded():
    """`offload_moe.load` (returns model, handle), unpatched at teardown."""
    yield from _unpatched_at_teardown(offload_moe.load)


HEAVY_MARKERS = ("bench", "served")  # the suite's longest tests: benches end to end, real servers


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Files with bench tests first, then those with served ones: `make test` spreads the suite over workers, and a
    long file left for last keeps one worker busy while the others idle. The vLLM plug-in's file goes last: its
    environment builds while the others run (`pytest_collection_finish`). Each file's tests stay together and in
    order, so its module-scoped fixtures are built once."""
    rank: dict[str, int] = {}
    for item in items:
        file = item.nodeid.split("::")[0]
        own = next((i for i, m in enumerate(HEAVY_MARKERS) if item.get_closest_marker(m)), len(HEAVY_MARKERS))
        if item.path.name == "test_vllm.py":
            own = len(HEAVY_MARKERS) + 1
        rank[file] = min(rank.get(file, own), own)
    items.sort(key=lambda item: rank[item.nodeid.split("::")[0]])  # stable: files keep their order otherwise


def pytest_collection_finish(session: pytest.Session) -> None:
    """Start building vLLM's environment (`tests/vllm_server.py`) while the tests before its own run: on a fresh
    machine the build is minutes of downloading and unpacking, which the CPU-bound tests hardly notice."""
    if any(item.path.name == "test_vllm.py" for item in session.items):
        from tests.vllm_server import BUILD, VENV

        if not (VENV / ".installed.json").exists():
            BUILD.start()
