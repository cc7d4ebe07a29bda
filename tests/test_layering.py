"""The suite owns its fixtures: only tests marked `bench` (the lab's benches and tools, end to end) import `lab`; the
lab imports the fixtures it shares from `tests`."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imports_lab(node: ast.AST) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.ImportFrom) and (n.module or "").split(".")[0] == "lab":
            return True
        if isinstance(n, ast.Import) and any(a.name.split(".")[0] == "lab" for a in n.names):
            return True
    return False


def _marks_bench(decorators: list[ast.expr]) -> bool:
    return any("bench" in ast.unparse(d) for d in decorators)


def test_only_bench_tests_import_the_lab():
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        tree = ast.parse(path.read_text())
        module_bench = any(
            isinstance(n, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "pytestmark" for t in n.targets)
            and "bench" in ast.unparse(n.value)
            for n in tree.body
        )
        if module_bench or path.name == "test_bench.py":
            continue
        for n in tree.body:
            if isinstance(n, ast.FunctionDef) and n.name.startswith("test_"):
                if _imports_lab(n) and not _marks_bench(n.decorator_list):
                    offenders.append(f"{path.name}::{n.name}")
            elif isinstance(n, ast.Import | ast.ImportFrom) and _imports_lab(n):
                offenders.append(f"{path.name} (module level)")
    assert not offenders, f"mark these @pytest.mark.bench or move what they import into tests/: {offenders}"
