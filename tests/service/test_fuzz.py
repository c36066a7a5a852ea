"""schemathesis over the whole OpenAPI surface of a real server on loopback: 0 server errors and 0
responses that contradict the document. Bounded and seeded (a fixed number of examples per operation),
so a failure reproduces with the printed ``st`` command line; tests/service/schemathesis.toml says which
statuses count as right answers and why."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servicekit import TOKEN, free_port, spawned, wait_for

ST = Path(sys.executable).with_name("st")
EXAMPLES, SEED = 40, 20261124

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not ST.exists(), reason="schemathesis is not installed (pip install -e '.[dev]')")]


def test_schemathesis_finds_no_server_error_and_no_schema_violation(bundle_root, tmp_path):
    root = tmp_path / "artifacts"  # the admin routes add, remove and reload: keep the shared bundle clean
    shutil.copytree(bundle_root, root, ignore=shutil.ignore_patterns("runs", "reports", "state"))
    port = free_port()
    env = {**os.environ, "RECSYS_BUNDLE_DIR": str(root), "RECSYS_STATE_DIR": str(tmp_path / "state"),
           "RECSYS_ADMIN_TOKEN": TOKEN, "RECSYS_LOG_LEVEL": "WARNING"}
    server = [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(port)]
    base = f"http://127.0.0.1:{port}"
    command = [str(ST), "--config-file", str(Path(__file__).with_name("schemathesis.toml")), "run", f"{base}/openapi.json",
               "--checks", "all", "--max-examples", str(EXAMPLES), "--seed", str(SEED), "--workers", "1",
               "--header", f"Authorization: Bearer {TOKEN}", "--no-color"]
    with spawned(server, tmp_path / "server.log", env) as proc:
        wait_for(f"{base}/ready", 90, proc)
        run = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path)  # its cache stays there
    summary = run.stdout[-3000:]
    assert run.returncode == 0, f"{' '.join(command)}\n{summary}"
    selected = re.search(r"Selected: (\d+)/(\d+)", summary)
    assert selected and selected.group(1) == selected.group(2), summary  # every operation in the document...
    assert f"Tested: {selected.group(1)}" in summary, summary  # ...was exercised
    generated = int(re.search(r"(\d+) generated", summary).group(1))
    assert generated >= int(selected.group(1)) * EXAMPLES // 2, summary
    assert "Traceback" not in (tmp_path / "server.log").read_text()
