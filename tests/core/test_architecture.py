"""The package graph (core <- offline, core <- service), checked by import-linter's contracts in
pyproject.toml: the core imports neither side nor any HTTP, command-line or training-loop library, and
offline and service never import each other. Imports inside functions count too."""
from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
LINT = Path(sys.executable).with_name("lint-imports")


def lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` over the packages under ``root``, with the contracts of its pyproject.toml."""
    return subprocess.run([str(LINT), "--no-cache"], cwd=root, capture_output=True, text=True, timeout=120)


def test_the_package_graph_keeps_its_contracts():
    result = lint(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "2 kept, 0 broken" in result.stdout


def test_a_core_module_that_imports_the_service_breaks_the_contract(tmp_path):
    """The check can fail: a copy of the packages with one core module reaching into ``service``."""
    for package in ("recsys", "offline", "service", "bench"):
        shutil.copytree(ROOT / package, tmp_path / package, ignore=shutil.ignore_patterns("__pycache__", "static"))
    (tmp_path / "recsys" / "leak.py").write_text("def f():\n    from service.config import get_settings\n")
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    result = lint(tmp_path)
    assert result.returncode != 0
    assert "recsys.leak -> service.config" in result.stdout
