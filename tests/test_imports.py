"""Import order: vmrun.config, vmrun.plugins and vmrun.block import cleanly in any order (no
cycle between them), share one parse_size, and the leaf modules stay leaves."""

from __future__ import annotations

import ast
import itertools
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
MODULES = ("vmrun.plugins.registry", "vmrun.config", "vmrun.block")


def run_python(code: str) -> str:
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    return res.stdout


@pytest.mark.parametrize("order", list(itertools.permutations(MODULES)),
                         ids=lambda order: ",".join(m.rsplit(".", 1)[-1] for m in order))
def test_modules_import_in_any_order(order: tuple[str, ...]) -> None:
    imports = "; ".join(f"import {m}" for m in order)
    out = run_python(f"{imports}\n"
                     "import vmrun.block.image_tools, vmrun.errors, vmrun.units\n"
                     "assert vmrun.config.parse_size is vmrun.block.parse_size\n"
                     "assert vmrun.block.image_tools.parse_size is vmrun.units.parse_size\n"
                     "assert vmrun.plugins.registry.parse_size is vmrun.units.parse_size\n"
                     "assert vmrun.config.parse_slot is vmrun.units.parse_slot\n"
                     "assert vmrun.config.ConfigError is vmrun.errors.ConfigError\n"
                     "print('ok')\n")
    assert out.strip() == "ok"


@pytest.mark.parametrize("leaf", ["vmrun.units", "vmrun.errors"])
def test_leaf_modules_import_nothing_else_from_vmrun(leaf: str) -> None:
    out = run_python(f"import sys, {leaf}\n"
                     "print(' '.join(sorted(m for m in sys.modules "
                     "if m == 'vmrun' or m.startswith('vmrun.'))))\n")
    assert set(out.split()) <= {"vmrun", "vmrun.errors", leaf}


def function_level_imports(path: Path) -> list[str]:
    """The modules ``path`` imports inside functions (the usual way to dodge a cycle)."""
    found: list[str] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for inner in ast.walk(node):
                if isinstance(inner, ast.ImportFrom) and inner.module:
                    found.append(inner.module)
                elif isinstance(inner, ast.Import):
                    found.extend(a.name for a in inner.names)
    return found


@pytest.mark.parametrize("path, forbidden", [
    ("vmrun/config.py", "vmrun.plugins"),
    ("vmrun/plugins/registry.py", "vmrun.config"),
    ("vmrun/block/image_tools.py", "vmrun.config"),
])
def test_no_function_level_imports_dodging_a_cycle(path: str, forbidden: str) -> None:
    late = [m for m in function_level_imports(REPO / path)
            if m == forbidden or m.startswith(forbidden + ".")]
    assert late == [], f"{path} imports {late} inside a function"


def test_a_size_with_a_newline_or_tab_inside_is_refused() -> None:
    import pytest

    from vmrun.units import parse_size

    assert parse_size(" 1 G ") == 1 << 30
    for bad in ("1\nG", "1G\n", "\t1G", "1\tG"):
        with pytest.raises(ValueError):
            parse_size(bad)
