"""Dependencies point one way: the leaf modules (options, ir, plan, format, errors, progress) import no other
onnxzip module but leaves, and no module imports another module's private names."""

import ast
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LEAVES = ("errors", "format", "ir", "plan", "options", "progress")
SOURCES = [p for folder in ("onnxzip", "retrain", "cli") for p in (REPO / folder).rglob("*.py")]


@pytest.mark.parametrize("leaf", LEAVES)
def test_a_leaf_loads_only_leaves(leaf):
    code = (f"import sys, onnxzip.{leaf}; "
            "print(' '.join(sorted(k[8:] for k in sys.modules if k.startswith('onnxzip.'))))")
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert set(loaded) <= set(LEAVES), loaded


def _private_imports(path: Path) -> list[str]:
    tree = ast.parse(path.read_text())
    return [f"{node.module}.{alias.name}" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
            and node.level > 0 for alias in node.names
            if alias.name.startswith("_") and not alias.name.endswith("__")]


def test_no_module_imports_another_modules_private_names():
    found = {p.relative_to(REPO).as_posix(): _private_imports(p) for p in SOURCES}
    assert not {k: v for k, v in found.items() if v}
