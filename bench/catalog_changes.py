"""A live catalogue at scale: catalogue changes sustained while serving, memory per worker, start to ready.

On a bundle ``bench/catalog_scale.py`` built (1M synthetic items by default), for this checkout and, with
``--against DIR``, another one (a git worktree of an older commit) in the same run:

1. Start to ``/ready`` and memory of one worker and of two (``python -m service --workers 2``): resident (RSS)
   and proportional (PSS, where pages two workers share count half to each, so the PSS sum is what the host
   pays). State on a local redis-server (the file backend serves one process).
2. ``/recommend`` at 200 requests/s (150/s unfiltered, 50/s with a genre + decade filter, at once; from ``hey``,
   whose connections fire together, and as Poisson arrivals from ``wrk``: ``--arrivals``) for ``--seconds``,
   first with no catalogue changes, then while a writer sends ``--change-rate`` item changes per second through
   ``POST /admin/items:batch`` (batches every 100 ms, half replacing bundle items, half adding new ones), on
   ``--workers`` workers (several counts: a service started for each), after ``--warmup`` seconds of the Poisson
   arrivals that are not counted (each user's first request after a start is slower). Reported: changes acknowledged per second, the batch call's p50 / p99, the requests'
   p50 / p99 with and without changes, the workers' CPU (cores; per request without changes, and what each
   change adds: CPU time is steadier than a tail latency on a shared machine), and the merge backlog (changed
   items not yet in the HNSW graph). Median of ``--runs`` runs.
3. One single-item upsert through ``/admin/items`` (the cost of one change alone).

Writes the "catalog-changes" section of docs/benchmarks.md.

    .venv/bin/python bench/catalog_changes.py --bundle-dir /tmp/catalog-1m [--against /tmp/base]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.report import BENCHMARKS, add_docs_option, latency_machine, update_section  # noqa: E402
from bench.serving import free_port, hey, poisson  # noqa: E402
from recsys.bundle import resolve  # noqa: E402
from service.client import NO_RETRY, ApiError, CatalogItem, Filters, RecsysClient  # noqa: E402

TOKEN = "catalog-changes-bench"
FILTER = {"genres_any": ["genre3"], "year_min": 1990, "year_max": 1999}  # as catalog_scale's "genre + decade"
BATCH_EVERY_S = 0.1
ARRIVALS = {"hey": "hey, bursts", "poisson": "Poisson"}


# ----------------------------------------------------------------------------- the service and its memory
class Redis:
    """One local redis-server for the run (appendfsync always: an acknowledged change is on disk); each service
    start gets a database of its own."""

    def __init__(self, tmp: Path):
        self.port, self.db = free_port(), 0
        cmd = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(tmp), "--save", "",
               "--appendonly", "yes", "--appendfsync", "always", "--databases", "64"]
        self.proc = subprocess.Popen(cmd, stdout=(tmp / "redis.log").open("w"), stderr=subprocess.STDOUT)
        time.sleep(0.5)

    def next_url(self) -> str:
        self.db += 1
        return f"redis://127.0.0.1:{self.port}/{self.db}"

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def start(tree: Path, bundle: Path, redis_url: str, workers: int, log: Path) -> tuple[subprocess.Popen, str, float]:
    """``python -m service`` from ``tree`` on ``bundle``, state on Redis; returns the process, its URL and the seconds
    until /ready."""
    port = free_port()
    env = {**os.environ, "RECSYS_BUNDLE_DIR": str(bundle), "RECSYS_STATE_BACKEND": "redis", "RECSYS_REDIS_URL": redis_url,
           "RECSYS_LOG_LEVEL": "WARNING", "RECSYS_ADMIN_TOKEN": TOKEN, "PYTHONPATH": str(tree)}
    cmd = [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", str(port), "--workers", str(workers)]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=tree)
    url = f"http://127.0.0.1:{port}"
    while time.perf_counter() - started < 900:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"{url}/ready", timeout=1).status_code == 200:
                return proc, url, time.perf_counter() - started
        except httpx.HTTPError:
            time.sleep(0.1)
    proc.kill()
    raise TimeoutError(f"not ready; see {log}")


def loaded(pids: list[int], deadline_s: float = 900) -> None:
    """Until every worker's resident memory stopped growing for 2 s (with two workers /ready answers as soon as
    one of them is up; the other may still be loading)."""
    last, still_since, started = None, time.time(), time.time()
    while time.time() - started < deadline_s:
        now = [memory_mib(pid)["rss"] for pid in pids]
        if last is None or any(abs(a - b) > 0.01 * b for a, b in zip(now, last)):
            last, still_since = now, time.time()
        elif time.time() - still_since >= 2:
            return
        time.sleep(0.2)


def workers_of(proc: subprocess.Popen, workers: int) -> list[int]:
    """The worker processes (the supervisor's children with several workers, the process itself with one)."""
    if workers == 1:
        return [proc.pid]
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    return [int(c) for c in children if "spawn_main" in Path(f"/proc/{c}/cmdline").read_text()]  # not the resource tracker


def memory_mib(pid: int) -> dict[str, float]:
    """RSS, PSS and the anonymous (private, not file-backed) part of RSS of a process, MiB (smaps_rollup). The
    rest of RSS is the bundle's mapped arrays that the process touched: page cache, shared with the other workers."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        key, value = line.split(":", 1)
        fields[key] = int(value.split()[0]) / 1024
    return {"rss": fields["Rss"], "pss": fields["Pss"], "anon": fields["Anonymous"]}


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU time the processes have used so far (``/proc/<pid>/stat``), seconds."""
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()  # (the name may hold spaces)
        ticks += int(fields[11]) + int(fields[12])
    return ticks / os.sysconf("SC_CLK_TCK")


def settle(url: str, users: list[str]) -> None:
    """A few requests on every worker, so that what a served request touches is resident when measured."""
    with RecsysClient(url, read_timeout=60, retry=NO_RETRY) as client:
        for user in users * 4:
            client.recommend(user, k=10)
            client.recommend(user, k=10, filters=Filters(**FILTER))


def footprint(tree: Path, bundle: Path, redis: Redis, users: list[str], workers: int) -> dict:
    """Seconds to ready and memory per worker once settled."""
    with tempfile.TemporaryDirectory() as tmp:
        proc, url, ready_s = start(tree, bundle, redis.next_url(), workers, Path(tmp) / "log")
        try:
            pids = workers_of(proc, workers)
            loaded(pids)
            settle(url, users)
            mem = [memory_mib(pid) for pid in pids]
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return {"ready_s": ready_s, "workers": mem}


# ----------------------------------------------------------------------------- changes while serving
class Writer(threading.Thread):
    """Item changes through the admin batch route at a fixed rate: half replace bundle items, half add new ones."""

    def __init__(self, url: str, rate: int, item_ids: list[str], seconds: float, seed: int):
        super().__init__(daemon=True)
        self.url, self.per_batch, self.seconds = url, max(1, round(rate * BATCH_EVERY_S)), seconds
        self.item_ids, self.rng = item_ids, np.random.default_rng(seed)
        self.acked, self.latencies, self.errors, self.elapsed = 0, [], [], 0.0

    def batch(self, n: int) -> list[CatalogItem]:
        old = [self.item_ids[i] for i in self.rng.choice(len(self.item_ids), n - n // 2, replace=False)]
        new = [f"churn-{self.rng.integers(1 << 62)}" for _ in range(n // 2)]
        return [CatalogItem(str(i), genres=[f"genre{self.rng.integers(18)}"], year=int(self.rng.integers(1950, 2020)))
                for i in [*old, *new]]

    def run(self) -> None:
        started = time.perf_counter()
        with RecsysClient(self.url, admin_token=TOKEN, read_timeout=60, retry=NO_RETRY) as client:
            tick = started
            while time.perf_counter() - started < self.seconds:
                items = self.batch(self.per_batch)
                sent = time.perf_counter()
                try:
                    client.upsert_items(items)
                    self.acked += len(items)
                except ApiError as err:
                    self.errors.append(f"{err.status} {err.message[:200]}")
                self.latencies.append(time.perf_counter() - sent)
                tick += BATCH_EVERY_S
                time.sleep(max(0.0, tick - time.perf_counter()))
        self.elapsed = time.perf_counter() - started


class Backlog(threading.Thread):
    """The merge backlog over a run: the service's ``recsys_index_unindexed_items`` gauge (changed items the HNSW
    graph does not hold yet, which every search scores exactly), read every ``every_s`` until ``stop``."""

    GAUGE = "recsys_index_unindexed_items"

    def __init__(self, url: str, every_s: float = 0.5):
        super().__init__(daemon=True)
        self.url, self.every_s, self.done, self.readings = url, every_s, threading.Event(), []

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=10) as client:
            while not self.done.wait(self.every_s):
                self.readings.append(self.read(client))
            self.readings.append(self.read(client))

    def read(self, client: httpx.Client) -> float:
        for line in client.get("/metrics").text.splitlines():
            if line.startswith(self.GAUGE + " ") or line.startswith(self.GAUGE + "{"):
                return float(line.rsplit(" ", 1)[1])
        raise RuntimeError(f"/metrics has no {self.GAUGE}")

    def stop(self) -> dict:
        self.done.set()
        self.join()
        return {"start": self.readings[0], "max": max(self.readings), "end": self.readings[-1]}


def serve_with_changes(url: str, users: list[str], item_ids: list[str], args, rate: int, seed: int, arrivals: str,
                       tmp: Path, pids: list[int]) -> dict:
    """Two streams of requests (150/s unfiltered, 50/s filtered) for ``args.seconds``, with a writer at ``rate``
    changes/s. ``arrivals``: "hey" (its 50 connections per stream fire on one tick: bursts; one body, so the first
    of ``users`` alone) or "poisson" (wrk, each connection an independent user: see ``bench.serving.poisson``; each
    request for one of ``users`` at random). Also the merge backlog (``Backlog``) at the run's start, its largest
    and at its end, and the CPU the worker processes ``pids`` used over the run."""
    plain = [json.dumps({"user_id": user, "k": 10}) for user in users]
    filtered = [json.dumps({"user_id": user, "k": 10, "filters": FILTER}) for user in users]
    writer = Writer(url, rate, item_ids, args.seconds, seed) if rate else None
    backlog = Backlog(url)
    backlog.start()
    cpu, started = cpu_seconds(pids), time.perf_counter()
    with ThreadPoolExecutor(2) as pool:
        if arrivals == "hey":
            runs = [pool.submit(hey, f"{url}/recommend", args.seconds, 50, 3, plain[0]),
                    pool.submit(hey, f"{url}/recommend", args.seconds, 50, 1, filtered[0])]
        else:
            runs = [pool.submit(poisson, url, "/recommend", args.seconds, 150, tmp, plain, seed=seed),
                    pool.submit(poisson, url, "/recommend", args.seconds, 50, tmp, filtered, seed=seed + 1000)]
        if writer:
            writer.start()
        unfiltered, with_filter = (r.result() for r in runs)
    if writer:
        writer.join()
    cpu, elapsed = cpu_seconds(pids) - cpu, time.perf_counter() - started
    answered = (unfiltered["rps"] + with_filter["rps"]) * args.seconds
    out = {"unfiltered": unfiltered, "filtered": with_filter, "unindexed": backlog.stop(),
           "cpu": {"cores": cpu / elapsed, "ms_per_request": cpu / max(answered, 1) * 1000}}
    if writer:
        if writer.errors:
            raise RuntimeError(f"catalogue changes refused: {writer.errors[:3]}")
        lat = np.array(writer.latencies) * 1000
        out["changes"] = {"per_s": writer.acked / writer.elapsed, "batch_p50": float(np.percentile(lat, 50)),
                          "batch_p99": float(np.percentile(lat, 99)), "batch": writer.per_batch}
    return out


def one_upsert(url: str) -> float:
    with RecsysClient(url, admin_token=TOKEN, read_timeout=600, retry=NO_RETRY) as client:
        started = time.perf_counter()
        client.upsert_item(CatalogItem("bench-one", genres=["genre3"], year=1995))
        return time.perf_counter() - started


def churn(tree: Path, bundle: Path, redis: Redis, users: list[str], item_ids: list[str], args, workers: int) -> dict:
    """The runs with and without changes (alternating, ``args.runs`` each) and one single upsert, on ``workers``
    workers, after ``args.warmup`` seconds of Poisson arrivals over all ``users`` (not counted: a user's first
    request after a start reads its history and its rows from memory no request touched yet; reported apart)."""
    runs: dict[tuple[str, int], list[dict]] = {(arrivals, rate): [] for arrivals in args.arrivals for rate in [0, *args.change_rate]}
    with tempfile.TemporaryDirectory() as tmp:
        proc, url, _ = start(tree, bundle, redis.next_url(), workers, Path(tmp) / "log")
        try:
            pids = workers_of(proc, workers)
            loaded(pids)
            settle(url, users[:1])
            single = one_upsert(url)
            warmup = (serve_with_changes(url, users, item_ids, argparse.Namespace(seconds=args.warmup), 0, -1, "poisson",
                                         Path(tmp), pids) if args.warmup else None)
            for run in range(args.runs):
                for (arrivals, rate), done in runs.items():
                    done.append(serve_with_changes(url, users, item_ids, args, rate, run, arrivals, Path(tmp), pids))
                    print(workers, run, arrivals, rate, done[-1], flush=True)
            memory = max((memory_mib(pid) for pid in pids), key=lambda m: m["rss"])
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    return {"single_upsert_s": single, "warmup": warmup, "rates": {key: median_of(done) for key, done in runs.items()},
            "memory_after": memory}


def median_of(runs: list[dict]) -> dict:
    """Each leaf's median over runs."""
    first = runs[0]
    if isinstance(first, dict):
        return {k: median_of([r[k] for r in runs]) for k in first}
    return float(np.median(runs))


# ----------------------------------------------------------------------------- report
def write(results: dict[str, dict], bundle: Path, args) -> None:
    catalog = json.loads((resolve(bundle) / "catalog.json").read_text())
    n, n_users = len(catalog["item_ids"]), min(args.users, len(catalog["user_ids"]))
    counts = " / ".join(str(w) for w in args.workers) + (" worker" if args.workers == [1] else " workers")
    lines = [f"Machine: {latency_machine()}; service, `hey` and the change writer on the same 2 cores. Bundle: {n:,} synthetic "
             f"items (`bench/catalog_scale.py`), state on a local Redis (appendfsync always), `--runs {args.runs}` (medians), {args.seconds} s per run.", "",
             "| checkout | start to ready, 1 worker | 2 workers | RSS per worker (1 / 2 workers) | PSS sum, 2 workers "
             f"| RSS after the change runs ({counts}, the largest; anonymous) | one upsert (`/admin/items`) |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        one, two = r["one"], r["two"]
        rss2 = " + ".join(f"{w['rss']:,.0f}" for w in two["workers"])
        after = " / ".join(f"{c['memory_after']['rss']:,.0f} ({c['memory_after']['anon']:,.0f})" for c in r["churn"].values())
        upserts = " / ".join(f"{c['single_upsert_s'] * 1000:,.0f}" for c in r["churn"].values())
        lines.append(f"| {name} | {one['ready_s']:.1f} s | {two['ready_s']:.1f} s | {one['workers'][0]['rss']:,.0f} / {rss2} MiB "
                     f"| {sum(w['pss'] for w in two['workers']):,.0f} MiB | {after} MiB | {upserts} ms |")
    lines += ["", f"`/recommend` at 200 requests/s (150/s unfiltered + 50/s genre + decade filter), with no changes and "
              f"while item changes are sent at a fixed rate in batches every {BATCH_EVERY_S * 1000:.0f} ms "
              f"(`POST /admin/items:batch`, half replacements, half additions), on {counts}, each count a service "
              f"started anew and warmed by {args.warmup} s of the Poisson arrivals (below); "
              "workers' CPU: cores busy over the run, and its CPU per request without changes or what a change added "
              "(over the same arrivals without changes); "
              "unindexed: the merge backlog (`recsys_index_unindexed_items`) at the run's start, its largest, at its end:", "",
              "| checkout | workers | arrivals | changes | changes acked/s | batch call p50 / p99 ms | unfiltered p50 / p99 ms "
              "| filtered p50 / p99 ms | workers' CPU, cores (ms) | unindexed start / max / end |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for workers, churned in r["churn"].items():
            rates = churned["rates"]
            for (arrivals, rate), run in rates.items():
                ch = run.get("changes")
                acked = f"{ch['per_s']:.0f}" if ch else "-"
                batch = f"{ch['batch_p50']:.1f} / {ch['batch_p99']:.1f}" if ch else "-"
                cores = run["cpu"]["cores"]
                cost = (f"{(cores - rates[(arrivals, 0)]['cpu']['cores']) / max(ch['per_s'], 1e-9) * 1000:.2f} ms a change" if ch
                        else f"{run['cpu']['ms_per_request']:.2f} ms a request")
                lines.append(f"| {name} | {workers} | {ARRIVALS[arrivals]} | {f'{rate}/s' if rate else 'none'} | "
                             f"{acked} | {batch} "
                             f"| {run['unfiltered']['p50']:.2f} / {run['unfiltered']['p99']:.2f} "
                             f"| {run['filtered']['p50']:.2f} / {run['filtered']['p99']:.2f} | {cores:.2f} ({cost}) "
                             f"| {run['unindexed']['start']:,.0f} / {run['unindexed']['max']:,.0f} / {run['unindexed']['end']:,.0f} |")
    lines += ["", "hey: 50 connections per stream at 3/s and 1/s each, fired on one tick (bursts of 50 every 333 ms and "
              f"every second), all for one user. Poisson: wrk with 150 and 50 connections, each waiting an exponentially "
              f"distributed time (mean 1 s) before each request, as independent users send them (`poisson` in "
              f"bench/serving.py), each request for one of {n_users:,} users at random."]
    warm = [(name, w, c["warmup"]) for name, r in results.items() for w, c in r["churn"].items() if c["warmup"]]
    if warm:
        lines += ["", f"The warm-up, the first {args.warmup} s of Poisson arrivals after ready (each user's first request since "
                  "the start among them), p99 unfiltered / filtered ms: " + "; ".join(
                      f"{name}, {w} worker{'s' * (w > 1)} {u['unfiltered']['p99']:.2f} / {u['filtered']['p99']:.2f}" for name, w, u in warm) + "."]
    body = "## Catalogue changes at scale\n\n" + "\n".join(lines)
    print(body)
    if not args.no_write:
        update_section("catalog-changes", body, args.docs / BENCHMARKS.name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle-dir", type=Path, default=Path("/tmp/catalog-scale"), help="a bundle catalog_scale.py built")
    p.add_argument("--against", type=Path, help="another checkout (e.g. a git worktree of main) measured in the same run")
    p.add_argument("--change-rate", type=lambda v: [int(x) for x in v.split(",")], default=[50, 200],
                   help="item changes per second sent while serving, comma-separated rates (default 50,200)")
    p.add_argument("--arrivals", type=lambda v: v.split(","), default=["hey", "poisson"],
                   help="request arrival patterns, comma-separated: hey (bursts), poisson (independent users)")
    p.add_argument("--workers", type=lambda v: [int(x) for x in v.split(",")], default=[1],
                   help="workers serving the change runs, comma-separated counts, each a service of its own (default 1)")
    p.add_argument("--warmup", type=int, default=10, help="seconds of Poisson arrivals, not counted, before the runs")
    p.add_argument("--users", type=int, default=1000, help="the bundle's first N users, whom the Poisson arrivals ask for")
    p.add_argument("--seconds", type=int, default=20)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true")
    add_docs_option(p)
    args = p.parse_args()
    if set(args.arrivals) - set(ARRIVALS):
        p.error(f"--arrivals {','.join(args.arrivals)}: each one of {', '.join(ARRIVALS)}")
    catalog = json.loads((resolve(args.bundle_dir) / "catalog.json").read_text())
    users, item_ids = list(catalog["user_ids"][: args.users]), list(catalog["item_ids"])
    trees = {"this change": ROOT, **({f"before ({args.against.name})": args.against} if args.against else {})}
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        redis = Redis(Path(tmp))
        try:
            for name, tree in trees.items():
                results[name] = {"one": footprint(tree, args.bundle_dir, redis, users[:3], 1),
                                 "two": footprint(tree, args.bundle_dir, redis, users[:3], 2),
                                 "churn": {w: churn(tree, args.bundle_dir, redis, users, item_ids, args, w) for w in args.workers}}
                print(name, results[name], flush=True)
        finally:
            redis.stop()
    write(results, args.bundle_dir, args)


if __name__ == "__main__":
    main()
