"""Every script under bench/ run at a tiny size: a smoke run, not a timing, so that an API change fails CI
instead of the next person's benchmark.

Each script runs as people run it (``python -m bench.NAME``: a fresh interpreter, the repository as working
directory) on a copy of the session's tiny bundle, or on synthetic data it makes itself, and writes its section
and figures to a scratch directory (``--docs``), never to docs/. The checks are that it exits 0 and prints or
writes what it measured; never how fast (the numbers of a run this small, on a shared machine, mean nothing).
A script that needs a load generator, redis-server, locust or chromium is skipped when that tool is missing
(.ci/run installs them).
"""
from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from bench.report import BENCHMARKS, DOCS, idle_wake_cost, machine, update_section
from recsys.bundle import read_bundle
from tests.browserkit import MISSING as NO_BROWSER
from tests.servicekit import free_port, spawned, wait_for

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT = 300  # seconds per script: several times a smoke run on a busy 2-core machine, so only a hang fails
APT = {"wrk": "wrk", "hey": "hey", "redis-server": "redis-server"}


# ----------------------------------------------------------------------------- helpers
def run_bench(name: str, *args: object, env: dict[str, str] | None = None) -> str:
    """``python -m bench.NAME ARGS`` from the repository root; returns its stdout, fails with its output's tail."""
    proc = subprocess.run([sys.executable, "-m", f"bench.{name}", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=TIMEOUT, env=env)
    assert proc.returncode == 0, f"bench.{name} exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def need(*tools: str) -> None:
    """Skip, naming the Debian package, unless every tool is on the PATH."""
    for tool in tools:
        if shutil.which(tool) is None:
            pytest.skip(reason=f"{tool} not installed (.ci/run installs it: apt-get install {APT[tool]})")


def section(docs: Path, name: str) -> str:
    """The ``name`` section a run wrote into ``docs``'s benchmarks.md (empty when it wrote none)."""
    path = docs / BENCHMARKS.name
    text = path.read_text() if path.exists() else ""
    start, end = f"<!-- {name}:start -->", f"<!-- {name}:end -->"
    return text.split(start, 1)[1].split(end, 1)[0] if start in text and end in text else ""


def published() -> dict[str, str]:
    """Hashes of what the benchmarks publish (docs/benchmarks.md, the figures and the raw JSON)."""
    files = [p for p in DOCS.iterdir() if p.is_file() and p.suffix in (".md", ".png", ".json")]
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


@contextmanager
def uvicorn(app: str, bundle: Path, tmp: Path) -> Iterator[str]:
    """``uvicorn APP`` on ``bundle`` on a free loopback port, its state under ``tmp``; yields its base URL."""
    url = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "RECSYS_BUNDLE_DIR": str(bundle), "RECSYS_STATE_DIR": str(tmp / "state"),
           "RECSYS_LOG_LEVEL": "WARNING", "PYTHONPATH": str(ROOT)}  # bench/ is not an installed package
    cmd = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1]]
    with spawned(cmd, tmp / "server.log", env) as proc:
        wait_for(f"{url}/ready", 120, proc)
        yield url


# ----------------------------------------------------------------------------- fixtures
@pytest.fixture(autouse=True)
def docs_untouched():
    """A smoke run writes to its scratch directory: the published numbers and figures stay as they are."""
    before = published()
    yield
    assert published() == before, "a smoke run rewrote files under docs/"


@pytest.fixture(scope="module")
def bundle(bundle_root, tmp_path_factory) -> Path:
    """A private copy of the session bundle: no smoke run's service can leave state in the shared one."""
    root = tmp_path_factory.mktemp("bench") / "artifacts"
    shutil.copytree(bundle_root, root, ignore=shutil.ignore_patterns("runs", "reports", "state"))
    return root


@pytest.fixture(scope="module")
def catalog(bundle) -> dict:
    return read_bundle(bundle).catalog


# ----------------------------------------------------------------------------- one test per script
def test_ann(tmp_path):
    out = run_bench("ann", "--sizes", 500, "--dim", 16, "--intrinsic-dim", 4, "--k", 10, "--ef", 10, 20,
                    "--ef-construction", 50, "--queries", 20, "--timed-queries", 10, "--repeats", 1, "--docs", tmp_path)
    assert "n=500 ef=20 recall@10=" in out
    assert "| 500 |" in section(tmp_path, "ann")
    assert (tmp_path / "ann.png").stat().st_size > 0


def test_batch(bundle, tmp_path):
    need("wrk")
    out = run_bench("batch", "--bundle", bundle, "--runs", 1, "--seconds", 1, "--batch-size", 50, "--docs", tmp_path)
    assert "| POST /recommend/batch, 50 users per call, 2 client(s) |" in out
    assert "offline engine" in section(tmp_path, "batch")


def test_catalog_scale(tmp_path):
    """Builds its own bundle (synthetic data, one short two-tower epoch) through the pipeline's bundle contract;
    catalog_changes serves that bundle with changes."""
    need("hey", "wrk", "redis-server")
    out = run_bench("catalog_scale", "--items", 500, "--users", 100, "--epochs", 1, "--ef-construction", 50,
                    "--bundle-dir", tmp_path / "bundle", "--runs", 1, "--seconds", 1, "--queries", 10, "--passes", 1,
                    "--old-queries", 1, "--merge-rows", 50, "--docs", tmp_path)
    assert "## Catalogue scale (500 items)" in out
    assert "| genre + decade |" in section(tmp_path, "catalog-scale")
    assert re.search(r"Inserting changed items into the graph .* [0-9.]+ ms of CPU per replaced item .* [0-9.]+ ms per added"
                     r".* room for marked elements is spent, [0-9.]+ ms per replaced .* [0-9.]+ ms per added",
                     section(tmp_path, "catalog-scale"), re.S)
    # the same bundle, served with changes (4 s: hey prints no 99th percentile for fewer than 100 answers)
    run_bench("catalog_changes", "--bundle-dir", tmp_path / "bundle", "--runs", 1, "--seconds", 4, "--change-rate", 20,
              "--workers", "1,2", "--warmup", 1, "--docs", tmp_path)
    written = section(tmp_path, "catalog-changes")
    for workers in (1, 2):
        for arrivals in ("hey, bursts", "Poisson"):
            assert f"| this change | {workers} | {arrivals} | 20/s |" in written and f"| this change | {workers} | {arrivals} | none |" in written
    assert re.search(r"first 1 s of Poisson arrivals .* this change, 1 worker [0-9.]+ / [0-9.]+; this change, 2 workers", written)
    rows = [line for line in written.splitlines() if re.match(r"\| this change \| \d \| (hey|Poisson)", line)]
    assert len(rows) == 8
    backlogs = [row.rsplit("|", 2)[1].split("/") for row in rows]  # unindexed start / max / end
    assert backlogs and all(len(b) == 3 and all(v.strip().replace(",", "").isdigit() for v in b) for b in backlogs)
    cpu = [re.search(r"\| (\d+\.\d\d) \((-?\d+\.\d\d) ms a (request|change)\) \|", row) for row in rows]
    assert all(cpu) and {m[3] for m in cpu} == {"request", "change"}
    assert all(float(m[1]) > 0 for m in cpu) and all(float(m[2]) > 0 for m in cpu if m[3] == "request")


def test_e2e(bundle, tmp_path):
    out = run_bench("e2e", "--bundle", bundle, "--rates", 20, "--duration", 1, "--warmup", 1, "--repeats", 1,
                    "--connections", 2, "--port", free_port(), "--log", tmp_path / "service.log", "--docs", tmp_path)
    assert "sequential, every user once" in out and "saturation:" in out
    assert "| 20.0 req/s fixed |" in section(tmp_path, "e2e")
    assert (tmp_path / "e2e.png").stat().st_size > 0


def test_locustfile(bundle, catalog, tmp_path):
    """The locust scenario through bench/run_load.sh (headless, CSVs out; exits 1 if any request failed), with
    the bundle's own ids and genres."""
    bin_dir = Path(sys.executable).parent
    if importlib.util.find_spec("locust") is None or shutil.which("locust", path=str(bin_dir)) is None:
        pytest.skip(reason="locust is not installed (pip install -e '.[dev]')")
    with uvicorn("service.app:app", bundle, tmp_path) as url:
        env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "TARGET": url, "DURATION": "3s",
               "USERS": "2", "SPAWN_RATE": "2", "OUT": str(tmp_path / "load"),
               "LOCUST_USER_IDS": ",".join(catalog["user_ids"]), "LOCUST_ITEM_IDS": ",".join(catalog["item_ids"]),
               "LOCUST_GENRES": ",".join(catalog["genre_names"])}
        proc = subprocess.run(["bash", "bench/run_load.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=TIMEOUT)
    assert proc.returncode == 0, f"run_load.sh exited {proc.returncode}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    stats = (tmp_path / "load" / "locust_stats.csv").read_text()
    assert "GET /recommend" in stats and "Aggregated" in stats


def test_reranker(bundle):
    out = run_bench("reranker", "--bundle", bundle, "--users", 20, "--candidates", 20, "--repeats", 1)
    assert "| ranker_features |" in out and "| score (" in out


def test_scaling(tmp_path):
    out = run_bench("scaling", "--sizes", "200x200x20", "--threads", 1, "--docs", tmp_path)
    assert "| 200 x 200 |" in out
    assert "| two-tower epoch |" in section(tmp_path, "scaling")
    assert (tmp_path / "scaling.png").stat().st_size > 0 and (tmp_path / "scaling.json").stat().st_size > 0


def test_serving(bundle, catalog, tmp_path):
    need("wrk", "hey", "redis-server")
    out = run_bench("serving", "--bundle", bundle, "--runs", 1, "--seconds", 1, "--user", catalog["user_ids"][0],
                    "--item", catalog["item_ids"][0], "--docs", tmp_path)
    assert "| service, 2 workers, Redis state |" in out
    assert "| bare FastAPI + hnswlib knn_query |" in section(tmp_path, "serving")


def test_impression_cost(bundle, tmp_path):
    need("wrk", "redis-server")
    out = run_bench("impression_cost", "--bundle", bundle, "--rounds", 2, "--seconds", 1, "--docs", tmp_path)
    assert "| Redis state, 2 workers |" in out
    assert "1 - on/off per round" in section(tmp_path, "impression-cost")


def test_simulate(tmp_path):
    """Trains its own tiny synthetic bundle and runs the three studies at smoke size."""
    out = run_bench("simulate", "--tiny", "--docs", tmp_path)
    assert "### a. A/A false alarms" in out and "### c. Interleaving" in out
    text = (tmp_path / "experiments.md").read_text()
    assert "<!-- simulate:start -->" in text and "Wilson 95% interval" in text


def test_click_bias(tmp_path):
    """Logs clicks on a tiny served bundle, trains the five rankers and scores them by the planted truth."""
    out = run_bench("click_bias", "--tiny", "--docs", tmp_path)
    assert "| (e) exposure pairs, true propensities |" in out and "| seed 0 estimated |" in out
    text = (tmp_path / "evaluation.md").read_text()
    assert "<!-- click-bias:start -->" in text and "(d) minus (c) per seed" in text


def test_gate_power(tmp_path):
    """The gate's power study on two bundles of one tiny synthetic data set (the same bundle twice: equal)."""
    from offline.__main__ import main as offline_main
    from tests.offline.test_events import TINY

    assert offline_main(["train", *TINY, "--no-refit", "--out", str(tmp_path / "b")]) == 0
    bundle = next(p for p in (tmp_path / "b").iterdir() if p.name[:1].isdigit())
    out = run_bench("gate_power", "--bundles", bundle, bundle, "--synthetic", "120x150", "--data-seed", 3, "--docs", tmp_path)
    assert "| 0% | +0.0000 [+0.0000, +0.0000] |" in out and "| 20% |" in out
    assert "<!-- gate-power:start -->" in (tmp_path / "evaluation.md").read_text()


def test_cold_items(tmp_path):
    """The cold-item protocol on a tiny synthetic catalogue with topic text: both bundles, four rankers."""
    out = run_bench("cold_items", "--dataset", "synthetic", "--size", "200x150", "--seeds", 0, "--epochs", 1,
                    "--docs", tmp_path)
    for arm in ("metadata only", "metadata + text", "content kNN", "popularity"):
        assert f"| {arm} | " in out
    assert "- seed 0: cold_recall@100" in out
    assert "<!-- cold-items-synthetic:start -->" in (tmp_path / "evaluation.md").read_text()


def test_text_encoding(tmp_path):
    out = run_bench("text_encoding", "--n", 64, "--repeats", 1, "--kinds", "synthetic title + description",
                    "--upsert-items", 200, "--measure", 100, "--docs", tmp_path)
    assert "| synthetic title + description | 1 |" in out and "| with text |" in out and "| without text |" in out
    assert "<!-- text-encoding:start -->" in (tmp_path / "benchmarks.md").read_text()


def test_variant_memory(bundle, tmp_path):
    out = run_bench("variant_memory", "--bundle", bundle, "--extra", 1, "--docs", tmp_path)
    assert "| + 1 extra version loaded |" in out
    assert "An extra bundle costs about" in section(tmp_path, "variant-memory")


def test_state_startup(bundle, tmp_path):
    out = run_bench("state_startup", "--bundle", bundle, "--events", 200, "--changes", 50, "--repeats", 1,
                    "--docs", tmp_path)
    assert "| this tree |" in out
    assert "250 records" in section(tmp_path, "state-startup")


def test_engine_cpu(bundle, tmp_path):
    out = run_bench("engine_cpu", "--bundle", bundle, "--runs", 1, "--passes", 1, "--docs", tmp_path)
    assert "| this tree " in out and "ms per request" in out
    assert "<!-- engine-cpu:start -->" in (tmp_path / "benchmarks.md").read_text()


def test_redis_writes(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip(reason="redis-server not installed (.ci/run installs it)")
    out = run_bench("redis_writes", "--events", 40, "--threads", 2, "--runs", 1, "--docs", tmp_path)
    assert "| cluster, 3 masters + 3 replicas | always | 1 |" in out and "| single Redis | everysec | 0 |" in out
    assert "<!-- redis-writes:start -->" in (tmp_path / "benchmarks.md").read_text()


def test_screenshot(bundle, catalog, tmp_path):
    if NO_BROWSER:
        pytest.skip(reason=NO_BROWSER)
    picture = tmp_path / "ui.png"
    out = run_bench("screenshot", "--bundle", bundle, "--user", catalog["user_ids"][0], "--out", picture)
    assert f"wrote {picture}" in out
    assert picture.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bare_app(bundle, catalog, tmp_path):
    """bench/serving.py's ceiling: served by uvicorn as serving.py serves it, it answers from the bundle's index."""
    with uvicorn("bench.bare_app:app", bundle, tmp_path) as url:
        response = httpx.get(f"{url}/recommend", params={"user_id": catalog["user_ids"][0], "k": 5}, timeout=30)
    assert response.status_code == 200, response.text
    items = response.json()["items"]
    assert len(items) == 5 and {i["item_id"] for i in items} <= set(catalog["item_ids"])


def test_report(tmp_path):
    """The helpers every script writes through (a library, not a script: exercised in process): a section is
    added, then replaced in place, the rest of the file kept."""
    path = tmp_path / BENCHMARKS.name
    update_section("a", "first", path)
    update_section("b", "other", path)
    update_section("a", "second", path)
    text = path.read_text()
    assert text.startswith("# Benchmarks") and "second" in text and "first" not in text
    assert text.index("<!-- a:start -->") < text.index("<!-- b:start -->") and "other" in text
    assert "cores" in machine()


def test_idle_wake_cost_compares_the_first_run_after_a_nap_with_a_warm_run():
    """On a fake clock where work takes 3 units right after a nap and 1 once warm (2 for the second run after it),
    the cost is 3: the first run against the last of the warm ones, never against a run still warming up."""
    now, since_nap = [0.0], [0]

    def sleep(_s: float) -> None:
        since_nap[0] = 0

    def work() -> None:
        now[0] += {0: 3.0, 1: 2.0}.get(since_nap[0], 1.0)
        since_nap[0] += 1

    assert idle_wake_cost(naps=5, work=work, warm=3, clock=lambda: now[0], sleep=sleep) == 3.0
    assert idle_wake_cost(naps=5, work=work, warm=0, clock=lambda: now[0], sleep=sleep) == 1.5
