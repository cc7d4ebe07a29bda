"""Every dotted name of this project's modules that the docs, the docstrings and the lab mention resolves: a module
moved or renamed cannot leave a stale reference behind."""

import ast
import importlib
import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NAME = re.compile(r"(?<![\w./-])((?:offload_moe|fairness|hooks|lab)(?:\.[A-Za-z_]\w*)+)")
# records of past rounds name what existed then; this file names a stale module on purpose
SKIP = ("docs/lab-notebook.md", "CHANGELOG.md", "docs/full/", "tests/test_names.py")
ELSEWHERE = {"vllm"}  # engines installed in environments of their own (fairness.vllm imports vLLM)


def mentioned() -> dict[str, list[str]]:
    """Dotted names -> the files that mention them (tracked .md and .py files)."""
    files = subprocess.run(["git", "ls-files", "*.md", "*.py"], cwd=ROOT, capture_output=True, text=True).stdout
    names: dict[str, list[str]] = {}
    for rel in files.split():
        if rel.startswith(SKIP):
            continue
        for name in NAME.findall((ROOT / rel).read_text(errors="replace")):
            names.setdefault(name.rstrip("."), []).append(rel)
    return names


def resolves(name: str) -> bool:
    """Whether `name` is a module, or an attribute chain on the longest importable module prefix. A trailing file
    suffix (`.py`, `.json`, `.md`) names a file of that module path."""
    parts = name.split(".")
    if parts[-1] in ("py", "json", "md", "jsonl", "csv", "onnx", "safetensors", "png"):
        stem = ROOT.joinpath(*parts[:-1])
        return stem.with_suffix("." + parts[-1]).exists() or stem.is_dir()
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError as e:
            if e.name in ELSEWHERE:  # a module of another environment's engine: read its source instead
                return resolves_statically(parts)
            if e.name and not ".".join(parts[:cut]).startswith(e.name):
                raise  # an installed dependency is missing: not a stale name
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return False
            obj = getattr(obj, attr)
        return True
    return False


def resolves_statically(parts: list[str]) -> bool:
    """Whether the longest prefix of `parts` that is a module file (or package) of the checkout defines the next
    part at its top level (a def, class, assignment or import); later attributes are not followed."""
    for cut in range(len(parts), 0, -1):
        path = ROOT.joinpath(*parts[:cut])
        source = path / "__init__.py" if path.is_dir() else path.with_suffix(".py")
        if not source.is_file():
            continue
        if cut == len(parts):
            return True
        tree = ast.parse(source.read_text())
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)}
        defined |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        defined |= {(a.asname or a.name).split(".")[0] for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)
                    for a in n.names}  # fmt: skip
        return parts[cut] in defined
    return False


def test_every_dotted_module_name_in_docs_docstrings_and_lab_resolves():
    names = mentioned()
    assert len(names) > 50  # the scan finds the names the docs use
    stale = {n: sorted(set(f)) for n, f in names.items() if not resolves(n)}
    assert not stale, "stale names (module moved or renamed?):\n" + "\n".join(f"{n}: {f}" for n, f in stale.items())


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("offload_moe.runtime.cache", True),
        ("offload_moe.runtime.nothing", False),
        ("offload_moe.patch", True),
        ("fairness.core.request.estimate_tokens", True),
        ("fairness.sim.workloads.estimate_tokens", True),
        ("fairness.vllm.FairScheduler", True),  # read from its source where vLLM is not installed
        ("fairness.vllm.compat.check_version", True),
        ("fairness.vllm.NoSuchScheduler", False),
    ],
)
def test_the_resolver_tells_a_stale_name(name, ok):
    assert resolves(name) == ok
