"""The Makefile's serving targets, read through ``make -n`` (prints the commands, runs none):
``make serve`` trains only when no bundle exists, ``make run`` never trains, ``make train`` always does."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAIN = "-m offline train --out"
UVICORN = "uvicorn service.app:app"

pytestmark = pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")


def dry_run(target: str, out: Path) -> str:
    """The commands ``make TARGET OUT=out`` would run."""
    done = subprocess.run(["make", "-n", target, f"OUT={out}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


@pytest.fixture
def existing(tmp_path: Path) -> Path:
    """A bundle root with a ``current`` pointer (what ``make train`` leaves behind)."""
    (tmp_path / "current").write_text("20250101-000000-abcdef12\n")
    return tmp_path


def test_serve_with_an_existing_bundle_serves_it_without_training(existing):
    commands = dry_run("serve", existing)
    assert TRAIN not in commands
    assert f"RECSYS_BUNDLE_DIR={existing} .venv/bin/{UVICORN}" in commands


def test_serve_without_a_bundle_trains_one_first_then_serves_it(tmp_path):
    commands = dry_run("serve", tmp_path / "empty")
    assert f"{TRAIN} {tmp_path / 'empty'} --quick" in commands  # the quick profile: serving within minutes
    assert commands.index(TRAIN) < commands.index(UVICORN)


def test_train_always_trains_the_full_model_even_when_a_bundle_exists(existing):
    commands = dry_run("train", existing)
    assert f"{TRAIN} {existing}" in commands and "--quick" not in commands


def test_run_never_trains_and_says_what_to_do_without_a_bundle(tmp_path, existing):
    assert TRAIN not in dry_run("run", existing)
    missing = tmp_path / "none"
    done = subprocess.run(["make", "--no-print-directory", "run", f"OUT={missing}", "PIP=true"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    assert f"no bundle under {missing}: run 'make train' first (or 'make serve')" in done.stderr
    assert UVICORN not in done.stdout


def test_evaluate_and_test_targets_exist():
    assert "-m offline evaluate --out reports" in dry_run("evaluate", ROOT / "artifacts")
    assert "-m pytest -q" in dry_run("test", ROOT / "artifacts")
