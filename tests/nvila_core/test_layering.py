"""The core is a framework: no module under nvila_core/ imports a workflow or a concrete component, so that
the built-ins need no privilege a third-party plugin lacks (docs/architecture.md has the whole import map)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
OUTSIDE_THE_CORE = ("nvila.workflows", "nvila.encoders", "nvila.compressors", "nvila.quant", "nvila.plugins")


def imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", sorted((ROOT / "nvila_core").rglob("*.py")), ids=lambda p: p.stem)
def test_core_module_imports_nothing_outside_the_core(path: Path) -> None:
    wrong = sorted(m for m in imported_modules(path) if m.startswith(OUTSIDE_THE_CORE))
    assert not wrong, f"{path.relative_to(ROOT)} imports {wrong}"


def test_the_check_sees_a_lazy_import_inside_a_function(tmp_path: Path) -> None:
    module = tmp_path / "m.py"
    module.write_text("def f():\n    from nvila.workflows.cli import run_cli\n")
    assert "nvila.workflows.cli" in imported_modules(module)
