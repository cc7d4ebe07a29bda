"""The reference models' measured text, frozen in `examples/corpus/` (the held-out split of Python's standard library
source, PSF licence, and a sample of the training split for calibration and the cards' training bits per byte),
checked by hash, so every Python version measures the same bytes. The lab's benches read it from here."""

from __future__ import annotations

import hashlib
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent  # the tests run from a checkout of the repository
CORPUS = {  # split -> (frozen file, sha256)
    "val": ("heldout.txt", "536b22168556b3136a37bcd3c12d73957923b6c848470ecfa749b83eef6b108a"),
    "train": ("train-sample.txt", "56f09c73b365a9e2734b283364d2e082668a9580b96ea7347e810e67ac0c8969"),
}


def corpus_text(split: str, max_bytes: int | None = None) -> str:
    """The frozen text of a split ("val": held out; "train": a sample of the training split), cut to `max_bytes`:
    the bytes the stdlib gave on Python 3.11.7 (files in sorted order, a blank line between), on any Python."""
    if split not in CORPUS:
        raise ValueError(f"split must be one of {sorted(CORPUS)}, got {split!r}")
    name, sha = CORPUS[split]
    data = (REPO / "examples" / "corpus" / name).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha:
        raise ValueError(f"examples/corpus/{name} is not the frozen corpus (sha256 differs): restore it from git")
    if max_bytes is not None:
        if max_bytes > len(data):
            raise ValueError(f"the frozen {split!r} text has {len(data)} bytes; {max_bytes} were asked for")
        data = data[:max_bytes]
    return data.decode(errors="ignore")
