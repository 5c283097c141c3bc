"""Benchmarks are modules of the package `benchmarks`, run as `python -m benchmarks.<name>`: no sys.path
edits, and no benchmark imports another's internals, only the shared modules."""

import ast
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"
SHARED = {"servers", "workloads", "run_record", "moe_shapes", "moe_timing", "server_cpu"}
MODULES = sorted(p for p in BENCHMARKS.glob("*.py") if p.name != "__init__.py")


@pytest.mark.parametrize("path", MODULES, ids=lambda p: p.stem)
def test_no_sys_path_edits_and_only_shared_modules_imported(path):
    tree = ast.parse(path.read_text())
    assert "sys.path" not in {ast.unparse(n) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "benchmarks":
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("benchmarks."):
            imported.add(node.module.split(".")[1])
        elif isinstance(node, ast.ImportFrom) and node.level:
            raise AssertionError(f"{path.name}: relative import")
        elif isinstance(node, ast.Import):
            imported |= {a.name.split(".")[1] for a in node.names if a.name.startswith("benchmarks.")}
            local = {a.name for a in node.names} & {p.stem for p in MODULES}
            assert not local, f"{path.name} imports {local} as top-level modules"
    assert imported <= SHARED, f"{path.name} imports benchmark internals: {imported - SHARED}"


def test_shell_runners_run_benchmarks_as_modules():
    for script in BENCHMARKS.glob("*.sh"):
        assert "python3 benchmarks/" not in script.read_text() and "python benchmarks/" not in script.read_text(), script
