"""The project's reference MoE models and their text: Python's standard library source (PSF licence).

Measured text is frozen in `examples/corpus/` (`tests.corpus` reads it); training (`make reference-model`) reads the
running interpreter's stdlib: the frozen files were cut from Python 3.11.7's.
The models live in the repository's `examples/` (built by the scripts there; not part of the installed package).
"""

from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # lab/ lives in a checkout of the repository
REFERENCE_MODEL = REPO / "examples" / "reference-moe"
HELD_OUT_FILES = 83  # stdlib files in the frozen held-out text (Python 3.11.7's held-out split)
MAX_FILE_BYTES = 200_000  # larger stdlib files are generated tables (encodings, pydoc topics), not code
HELD_OUT_BUCKETS = 20  # one module in 20 (by hash) is held out for validation


def model_dir(path: str | Path) -> Path:
    """`path` if it is a model directory (has a config.json), else a clear error saying what to pass."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a model directory (no config.json); the reference model is {REFERENCE_MODEL} "
            f"(`make reference-model` builds it), or pass a model directory explicitly"
        )
    return path


def _module_of(rel: Path) -> str:
    """Dotted module name of a stdlib file: `email/mime/text.py` -> `email.mime.text`."""
    return ".".join(rel.with_suffix("").parts)


def is_held_out(module: str) -> bool:
    """Deterministic split by top-level module name, identical on every machine."""
    return int(hashlib.md5(module.encode()).hexdigest(), 16) % HELD_OUT_BUCKETS == 0


def stdlib_files(split: str) -> list[Path]:
    """Sorted .py files of the running interpreter's standard library for `split` in {"train", "val"}."""
    if split not in ("train", "val"):
        raise ValueError(f"split must be 'train' or 'val', got {split!r}")
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for p in sorted(root.rglob("*.py")):
        rel = p.relative_to(root)
        if "site-packages" in rel.parts or p.stat().st_size > MAX_FILE_BYTES:
            continue
        if is_held_out(_module_of(rel)) == (split == "val"):
            out.append(p)
    return out


def read_source(path: Path) -> str:
    """A stdlib file as text; the few that are not UTF-8 (encoding tests) get replacement characters."""
    return path.read_text(encoding="utf-8", errors="replace")
