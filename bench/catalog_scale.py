"""Serving at catalogue scale: a synthetic 1M-item bundle, loaded and served as production serves it.

1. Builds (once; reused while ``--bundle-dir`` holds one) a bundle through the repository's own bundle
   contract: synthetic data (``offline.synthetic.generate``), the pipeline's split, feature tables and
   ``bundle_arrays``, a two-tower trained for ``--epochs`` (0 = untrained), the HNSW index (M=16,
   ``--ef-construction``, 2 build threads), a LambdaRank re-ranker trained briefly on the two-tower's
   candidates, then ``assemble_bundle`` + ``write_bundle``.
2. In process: the engine's filtered search against exact filtered search (recall and time per query)
   for filters of several selectivities, and the alternatives it was chosen over.
3. The service (uvicorn, 1 worker, loopback): time from start to ``/ready`` and resident memory, then
   ``/recommend`` p50 / p99 at a fixed 200 requests/s (``hey -z 10s -q 50 -c 4``), unfiltered and with a
   genre + year filter, median of ``--runs`` runs (one user per run).

Writes the "catalog-scale" section of docs/benchmarks.md.

    .venv/bin/python bench/catalog_scale.py --items 1000000 --bundle-dir /tmp/catalog-1m --runs 3
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np
import torch
from threadpoolctl import threadpool_limits

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from bench.e2e import stage_means, stage_totals  # noqa: E402
from bench.report import BENCHMARKS, add_docs_option, machine, update_section  # noqa: E402
from bench.serving import free_port, hey  # noqa: E402
from offline.data import dataset_fingerprint  # noqa: E402
from offline.pipeline import IndexConfig, Recall, assemble_bundle, bundle_arrays  # noqa: E402
from offline.ranker import RankerConfig  # noqa: E402
from offline.recall_eval import build_index  # noqa: E402
from offline.split import temporal_split  # noqa: E402
from offline.synthetic import generate  # noqa: E402
from offline.tower_tables import TowerTables  # noqa: E402
from offline.train_ranker import train_rankers  # noqa: E402
from offline.train_recall import RecallConfig, train_two_tower  # noqa: E402
from offline.two_tower import TwoTower  # noqa: E402
from recsys.bundle import CURRENT, read_bundle, resolve, write_bundle  # noqa: E402
from recsys.engine.allowed import FETCH_MARGIN  # noqa: E402
from recsys.engine.engine import Engine  # noqa: E402
from recsys.engine.filters import RowFilter  # noqa: E402
from recsys.query import Filters, Item  # noqa: E402
from recsys.topk import top_k  # noqa: E402
from service.client import NO_RETRY, CatalogItem, RecsysClient  # noqa: E402
from service.client import Filters as RequestFilters  # noqa: E402  (recsys.query's Filters is the engine's)

N_GENRES = 18  # as MovieLens; each synthetic item has one genre, 40% a second: a genre holds ~8% of the items
BUILD_THREADS = 2
RATE, HEY_WORKERS = 200, 4  # requests/s, as hey -q 50 -c 4
ADMIN_TOKEN = "catalog-scale-bench"


# ----------------------------------------------------------------------------- the bundle
def build_bundle(root: Path, args) -> dict[str, float]:
    """Write a synthetic bundle of ``args.items`` items under ``root``; returns seconds per step."""
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    ds = generate(n_users=args.users, n_items=args.items, n_genres=N_GENRES, dim=16, interactions_per_user=20,
                  seed=args.seed)
    split = temporal_split(ds.interactions, ds.n_users, ds.n_items, max_eval_users=1000)
    seconds["data"] = time.perf_counter() - started
    recall_cfg = RecallConfig(epochs=max(args.epochs, 1), hard_negatives=0, patience=1, threads=BUILD_THREADS, seed=args.seed)
    model, tables = two_tower(ds, split, recall_cfg, root, args.epochs)
    seconds["two-tower"] = time.perf_counter() - started - sum(seconds.values())
    index_cfg = IndexConfig(m=16, ef_construction=args.ef_construction, ef=256, build_threads=BUILD_THREADS)
    vectors = tables.item_vectors(model)
    index = build_index(vectors, index_cfg.m, index_cfg.ef_construction, index_cfg.ef, threads=BUILD_THREADS, seed=args.seed)
    seconds["index"] = time.perf_counter() - started - sum(seconds.values())
    recall = Recall(model, vectors, index, bundle_arrays(ds, split, tables, vectors))
    ranker_cfg = RankerConfig(losses="lambdarank", lambdamart=False, epochs=3, max_queries=1000, seed=args.seed)
    ranker = train_rankers(recall.context(tables, index_cfg), split, ranker_cfg).default_state
    seconds["arrays + ranker"] = time.perf_counter() - started - sum(seconds.values())
    metrics = {"note": f"synthetic catalogue-scale bundle (bench/catalog_scale.py), two-tower epochs: {args.epochs}"}
    bundle = assemble_bundle(ds, split, tables, recall, recall_cfg, index_cfg, ranker_cfg, metrics,
                             dataset_fingerprint(ds), ranker)
    write_bundle(root, bundle)
    seconds["write"] = time.perf_counter() - started - sum(seconds.values())
    (root / "build.json").write_text(json.dumps({"seconds": seconds, "args": vars(args)}, default=str, indent=2))
    return seconds


def two_tower(ds, split, cfg: RecallConfig, root: Path, epochs: int) -> tuple[TwoTower, TowerTables]:
    """The towers: briefly trained by the pipeline's trainer, or left at their seeded initialisation."""
    if epochs:
        model, tables, _ = train_two_tower(ds, split, cfg, root / "runs")
        return model.cpu(), tables
    torch.manual_seed(cfg.seed)
    tables = TowerTables.build(ds, cfg.history_len, torch.device("cpu"))
    spec = tables.spec
    model = TwoTower(ds.n_users, ds.n_items, spec.n_genres, spec.n_item_dense, spec.item_cat_sizes, spec.user_cat_sizes,
                     len(spec.user_numeric), cfg.history_len, cfg.emb_dim, cfg.dim, cfg.hidden)
    return model, tables


# ----------------------------------------------------------------------------- filtered search, in process
FILTERS = {  # synthetic years are uniform over 1950-2019; a genre holds about 8% of the items
    "genre + decade": {"genres_any": ["genre3"], "year_min": 1990, "year_max": 1999},
    "one year": {"year_min": 1995, "year_max": 1995},
    "2 genres + 20 years": {"genres_any": ["genre3", "genre7"], "year_min": 1980, "year_max": 1999},
    "3 genres + 30 years": {"genres_any": ["genre1", "genre2", "genre3"], "year_min": 1970, "year_max": 1999},
    "one genre": {"genres_any": ["genre5"]},
    "all but one genre": {"genres_none": ["genre0"]},
}
SERVED = ("genre + decade", "3 genres + 30 years")  # the filtered requests of the HTTP runs: exact and HNSW paths
DEPTH = 200  # the service's default candidate depth
TOP = 10  # the k of a request


@dataclass
class Query:
    """One known user's serving vector and seen rows, as a request resolves them."""

    vec: np.ndarray
    seen: np.ndarray


def queries(engine: Engine, n: int, seed: int) -> list[Query]:
    users = np.random.default_rng(seed).choice(list(engine.user_row), n, replace=False)
    out = []
    for user in users:
        ctx = engine.users.resolve(str(user))
        out.append(Query(engine.users.vectors([ctx])[0], ctx.hist_items))
    return out


def catalogue_mask(engine: Engine, filters: Filters | None) -> np.ndarray:
    """The rows ``filters`` admits, by a pass over the whole catalogue (what every filtered request did before
    this change, and the ground truth here)."""
    catalog = engine.catalog
    mask = catalog.active.copy()
    if filters is None:
        return mask
    genres, year = catalog.arrays["item_genres"] > 0, catalog.arrays["item_year"]
    if filters.genres_any:
        mask &= genres[:, [engine.genre_col[g] for g in filters.genres_any]].any(axis=1)
    if filters.genres_none:
        mask &= ~genres[:, [engine.genre_col[g] for g in filters.genres_none]].any(axis=1)
    if filters.year_min is not None:
        mask &= year >= filters.year_min  # an unknown (NaN) year fails any bound
    if filters.year_max is not None:
        mask &= year <= filters.year_max
    return mask


def exact_truth(engine: Engine, mask: np.ndarray, q: Query) -> np.ndarray:
    """Ground truth: every admitted, unseen row scored."""
    rows = np.flatnonzero(mask)
    rows = rows[~np.isin(rows, q.seen)]
    return top_k(rows, engine.catalog.vectors[rows] @ q.vec, DEPTH)[0]


def strategies(engine: Engine) -> dict[str, Callable[[Filters, Query], np.ndarray]]:
    """Each way of answering a filtered search, as candidate rows."""
    def with_limit(limit: int):
        def run(filters: Filters, q: Query) -> np.ndarray:
            engine.exact_limit = limit
            try:
                return engine.search(q.vec, DEPTH, engine.allowed(engine.catalog, filters, q.seen))[1]
            finally:
                engine.exact_limit = chosen
        return run
    chosen = engine.exact_limit
    return {f"chosen (exact up to {chosen:,} rows, else HNSW over-fetch)": with_limit(chosen),
            "exact over the admitted rows, always": with_limit(len(engine.catalog.ids)),
            "HNSW over-fetch + check, always": with_limit(0),
            "HNSW filter callback (hnswlib filter=)": lambda filters, q: callback_search(engine, filters, q)}


def callback_search(engine: Engine, filters: Filters, q: Query) -> np.ndarray:
    """hnswlib's own filtered search, the admitted rows as a Python set; exact when it finds fewer than k."""
    allowed = engine.allowed(engine.catalog, filters, q.seen)
    rows = allowed.every_row(engine.catalog)
    admitted = set(rows.tolist())
    try:
        labels, _ = engine.bundle.index.knn_query(q.vec[None], k=min(DEPTH, len(rows)), filter=admitted.__contains__)
        return labels[0].astype(np.int64)
    except RuntimeError:
        return top_k(rows, engine.catalog.vectors[rows] @ q.vec, DEPTH)[0]


def mask_search(engine: Engine, filters: Filters, q: Query) -> np.ndarray:
    """The search before this change: a mask over the catalogue, then an over-fetch of every item the mask
    drops (so it grows with the catalogue)."""
    catalog = engine.catalog
    mask = catalogue_mask(engine, filters)
    mask[q.seen] = False
    n_allowed = int(mask.sum())
    labels, _ = engine.bundle.index.knn_query(q.vec[None], k=min(DEPTH + catalog.n_active - n_allowed, catalog.n_active))
    labels = labels[0].astype(np.int64)
    return labels[mask[labels]][:DEPTH]


def measure_strategy(run, filters: Filters | None, qs: list[Query], truth: list[np.ndarray], passes: int) -> dict[str, float]:
    """p50 / p99 ms per query (median over passes) and mean recall@DEPTH and @TOP (the candidates' best TOP by
    inner product) against exact filtered search."""
    p50, p99, recall, recall_top = [], [], [], []
    for _ in range(passes):
        times = []
        for q, t in zip(qs, truth):
            start = time.perf_counter()
            got = run(filters, q)
            times.append(time.perf_counter() - start)
            recall.append(len(np.intersect1d(got, t)) / max(len(t), 1))
            recall_top.append(len(np.intersect1d(got[:TOP], t[:TOP])) / max(min(len(t), TOP), 1))
        p50.append(np.percentile(times, 50) * 1000)
        p99.append(np.percentile(times, 99) * 1000)
    return {"p50": float(np.median(p50)), "p99": float(np.median(p99)), "recall": float(np.mean(recall)),
            "recall_top": float(np.mean(recall_top))}


def in_process(root: Path, args) -> dict:
    """Filtered search by each strategy, for every filter, over the same users; one BLAS and torch thread, as
    the service runs its requests."""
    torch.set_num_threads(1)
    threadpool_limits(1, user_api="blas")
    engine = Engine.from_bundle(read_bundle(root))
    out: dict = {"rows": {}, "admitted": {}}
    qs = queries(engine, args.queries, args.seed)
    everything = catalogue_mask(engine, None)
    truth = [exact_truth(engine, everything, q) for q in qs]
    out["admitted"]["unfiltered"] = int(everything.sum())
    out["rows"][("unfiltered", "HNSW (the index's own recall, for reference)")] = measure_strategy(
        lambda f, q: engine.search(q.vec, DEPTH, engine.allowed(engine.catalog, f, q.seen))[1], None, qs, truth, args.passes)
    runs = strategies(engine)
    for name, spec in FILTERS.items():
        filters = Filters(**spec)
        mask = catalogue_mask(engine, filters)
        truth = [exact_truth(engine, mask, q) for q in qs]
        out["admitted"][name] = int(mask.sum())
        for strategy, run in runs.items():
            out["rows"][(name, strategy)] = measure_strategy(run, filters, qs, truth, args.passes)
        if name == SERVED[0]:
            out["rows"][(name, "before: catalogue mask + over-fetch")] = measure_strategy(
                lambda f, q: mask_search(engine, f, q), filters, qs[: args.old_queries], truth[: args.old_queries], 1)
            out["partition"] = partition(engine, filters, qs, truth, args)
        print(name, {s: r for (f, s), r in out["rows"].items() if f == name}, flush=True)
    out["merge"] = graph_merge(engine, args.merge_rows, args.seed)  # last: it changes the catalogue
    return out


def graph_merge(engine: Engine, n: int, seed: int) -> dict[str, float]:
    """CPU per item of inserting changed items into the HNSW graph as the merge thread does (one item per hold of
    the write lock), for ``n`` replaced bundle items and ``n`` added ones, twice each, while the graph has room for
    marked elements and again once it has none (``garbage_room`` spent: in place / into a marked element's place):
    ms per item, median."""
    live, rng, ids = engine.live, np.random.default_rng(seed), list(engine.catalog.ids)
    took: dict[str, list[float]] = {}
    for spent in (False, True):
        if spent:
            live.garbage_room = 0  # as after 1/16 of the catalogue was replaced: every change reuses a place
        for kind in ("replaced", "added") * 2:
            raws = ([ids[i] for i in rng.choice(len(ids), n, replace=False)] if kind == "replaced"
                    else [f"merge-{rng.integers(1 << 62)}" for _ in range(n)])
            items = [Item(item_id=raw, genres=[f"genre{rng.integers(18)}"], year=int(rng.integers(1950, 2020))) for raw in raws]
            with live.merging:  # the merge thread held back: the rows wait, unindexed, for the loop below
                rows = live.commit(engine.changes.prepare(items))
                started = time.process_time()
                for row in rows.tolist():
                    with live.rw.writing():
                        live._index(np.array([row]))
                took.setdefault(f"{kind}{' (room spent)' if spent else ''}", []).append(
                    (time.process_time() - started) / len(rows) * 1000)
    return {kind: float(np.median(v)) for kind, v in took.items()}


def partition(engine: Engine, filters: Filters, qs: list[Query], truth: list[np.ndarray], args) -> dict[str, float]:
    """The partition alternative for one genre: its own HNSW index (built here, timed), searched with the
    year check and an over-fetch; per-genre partitions for every genre would cost the sum of such builds."""
    col = engine.genre_col[filters.genres_any[0]]
    rows = engine.catalog.filters.by_genre[col].rows
    started = time.perf_counter()
    index = build_index(engine.catalog.vectors[rows], 16, args.ef_construction, 256, threads=BUILD_THREADS, seed=args.seed)
    build_s = time.perf_counter() - started
    rule = RowFilter([], [], filters.year_min, filters.year_max)
    share = float(catalogue_mask(engine, Filters(year_min=filters.year_min, year_max=filters.year_max)).mean())

    def run(_, q: Query) -> np.ndarray:
        labels, _ = index.knn_query(q.vec[None], k=min(int(FETCH_MARGIN * DEPTH / share) + len(q.seen), len(rows)))
        found = rows[labels[0]]
        keep = rule.admits(engine.catalog.filters, found) & ~np.isin(found, q.seen)
        return found[keep][:DEPTH]

    sizes = sum(len(g.rows) for g in engine.catalog.filters.by_genre)
    return {"items": len(rows), "build_s": build_s, "all_genres_build_s": build_s * sizes / len(rows),
            "all_genres_items": sizes, **measure_strategy(run, filters, qs, truth, args.passes)}


# ----------------------------------------------------------------------------- the service on loopback
def rss_mib(pid: int) -> dict[str, float]:
    """Resident memory now and at its peak (VmHWM), MiB."""
    status = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(status[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


def start_service(root: Path, port: int, state: Path, log: Path) -> tuple[subprocess.Popen, float]:
    """uvicorn with one worker on ``root``; returns the process and the seconds until /ready answered 200."""
    env = {**os.environ, "RECSYS_BUNDLE_DIR": str(root), "RECSYS_STATE_DIR": str(state), "RECSYS_LOG_LEVEL": "WARNING",
           "RECSYS_ADMIN_TOKEN": ADMIN_TOKEN}
    cmd = [sys.executable, "-m", "uvicorn", "service.app:app", "--host", "127.0.0.1", "--port", str(port),
           "--workers", "1", "--no-access-log", "--log-level", "warning"]
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    while time.perf_counter() - started < 900:
        if proc.poll() is not None:
            raise RuntimeError(f"the service exited: {log.read_text()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/ready", timeout=1).status_code == 200:
                return proc, time.perf_counter() - started
        except httpx.HTTPError:
            time.sleep(0.2)
    proc.kill()
    raise TimeoutError(f"the service did not become ready; see {log}")


def serve(root: Path, args) -> dict:
    """Load time and memory of the service, fixed-rate latency per request kind, and one catalogue change."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    with tempfile.TemporaryDirectory() as tmp:
        proc, load_s = start_service(root, port, Path(tmp) / "state", Path(tmp) / "service.log")
        try:
            out = {"load_s": load_s, "memory_ready": rss_mib(proc.pid), "latency": {}}
            users = json.loads((resolve(root) / "catalog.json").read_text())["user_ids"][: args.runs]
            with RecsysClient(url, admin_token=ADMIN_TOKEN, read_timeout=300, retry=NO_RETRY) as client:
                for name in ("unfiltered", *SERVED):
                    out["latency"][name] = latency(client, users, FILTERS.get(name), args)
                out["memory_after"] = rss_mib(proc.pid)
                out["catalogue_change_s"] = catalogue_change(client)
        finally:
            proc.terminate()
            proc.wait(timeout=30)
    return out


def latency(client: RecsysClient, users: list[str], filters: dict | None, args) -> dict:
    """Median over runs (one user each) of hey's p50 / p99 at 200 requests/s, and the mean time per stage."""
    before, runs = stage_totals(client), []
    for user in users:
        body = json.dumps({"user_id": user, "k": 10, **({"filters": filters} if filters else {})})
        client.recommend(user, k=10, filters=RequestFilters(**filters) if filters else None)  # warm what hey asks
        runs.append(hey(f"{client.base_url}/recommend", args.seconds, RATE // HEY_WORKERS, HEY_WORKERS, body))
    return {"p50": float(np.median([r["p50"] for r in runs])), "p99": float(np.median([r["p99"] for r in runs])),
            "rps": float(np.median([r["rps"] for r in runs])), "stages": stage_means(before, stage_totals(client))}


def catalogue_change(client: RecsysClient) -> dict[str, float]:
    """Seconds to add one item and to remove it through the admin API (each rebuilds the snapshot)."""
    started = time.perf_counter()
    client.upsert_item(CatalogItem("bench-new", genres=["genre3"], year=1995))
    added = time.perf_counter() - started
    client.remove_item("bench-new")
    return {"add": added, "remove": time.perf_counter() - started - added}


# ----------------------------------------------------------------------------- report
def write(build: dict, search: dict, service: dict, args) -> None:
    made = build["args"]
    towers = f"trained for {made['epochs']} epoch(s) (no hard negatives)" if made["epochs"] else "untrained (seeded initialisation)"
    lines = [
        f"Machine: {machine()} (the 2-core box), service and load generator on the same cores; other jobs (training) "
        "shared the machine during these runs, so the latencies are noisy: re-run on a quiet machine with "
        f"`.venv/bin/python bench/catalog_scale.py --items {made['items']} --bundle-dir {args.bundle_dir}`.", "",
        f"Bundle: {made['items']:,} items, {made['users']:,} users, synthetic (`offline.synthetic.generate`, 18 genres, "
        f"years 1950-2019), written by `write_bundle` through the pipeline's `bundle_arrays` / `assemble_bundle`; "
        f"two-tower {towers}; HNSW M=16, ef_construction={made['ef_construction']}, ef=256, built with "
        f"{BUILD_THREADS} threads; LambdaRank re-ranker trained for 3 epochs on 1,000 users' candidates. Build: "
        + ", ".join(f"{k} {v:.0f} s" for k, v in build["seconds"].items()) + ".", "",
        "| service (uvicorn, 1 worker) | value |", "|---|---|",
        f"| start to `/ready` (bundle read and checked, engine built) | {service['load_s']:.1f} s |",
        f"| resident memory after load | {service['memory_ready']['VmRSS']:,.0f} MiB |",
        f"| resident memory after the runs (peak) | {service['memory_after']['VmRSS']:,.0f} MiB "
        f"({service['memory_after']['VmHWM']:,.0f} MiB) |",
        f"| add one item / remove it (admin API) | {service['catalogue_change_s']['add']:.2f} s / "
        f"{service['catalogue_change_s']['remove']:.3f} s |", "",
        f"`POST /recommend` (k=10, {DEPTH} candidates re-ranked) at a fixed {RATE} requests/s, `hey -z {args.seconds}s "
        f"-q {RATE // HEY_WORKERS} -c {HEY_WORKERS}`, median of {args.runs} runs (a different known user each run); "
        "stage means from the service's `recsys_stage_seconds`:", "",
        "| request | filter admits | p50 ms | p99 ms | req/s | features | user_encoding | ann_search | rerank |",
        "|---|---|---|---|---|---|---|---|---|"]
    n = made["items"]
    for name, r in service["latency"].items():
        admits = f"{search['admitted'][name] / n:.1%}" if name in search["admitted"] else "-"
        stages = " | ".join(f"{r['stages'].get(s, float('nan')):.3f}" for s in ("features", "user_encoding", "ann_search", "rerank"))
        lines.append(f"| {name} | {admits} | {r['p50']:.2f} | {r['p99']:.2f} | {r['rps']:.0f} | {stages} |")
    lines += ["", f"Filtered search in process (`Engine.allowed` + `Engine.search`, depth {DEPTH}, one thread), "
              f"{args.queries} known users (the pre-change search: {args.old_queries}), ms per query (median of "
              f"{args.passes} passes) and recall against exact filtered search (every admitted item scored): of the "
              f"{DEPTH} candidates, and of their best {TOP} by inner product:", "",
              f"| filter | admitted items | strategy | p50 ms | p99 ms | recall@{DEPTH} | recall@{TOP} |",
              "|---|---|---|---|---|---|---|"]
    for (name, strategy), r in search["rows"].items():
        lines.append(f"| {name} | {search['admitted'][name]:,} | {strategy} | {r['p50']:.2f} | {r['p99']:.2f} "
                     f"| {r['recall']:.4f} | {r['recall_top']:.4f} |")
    part = search["partition"]
    lines += ["", f"Partition alternative, for the '{SERVED[0]}' filter: that genre's own HNSW index ({part['items']:,} items) "
              f"built in {part['build_s']:.0f} s, searched with the year check and an over-fetch: p50 {part['p50']:.2f} ms, "
              f"p99 {part['p99']:.2f} ms, recall@{DEPTH} {part['recall']:.4f}, recall@{TOP} {part['recall_top']:.4f}. One index per genre would hold "
              f"{part['all_genres_items']:,} items (an item is in each of its genres' indexes) and take about "
              f"{part['all_genres_build_s']:.0f} s to build, on top of the main index, and every catalogue change would "
              "touch several indexes.", "",
              f"Inserting changed items into the graph (the merge thread's work, one item per hold of the write lock, in "
              f"process, {args.merge_rows} items twice, median): {search['merge']['replaced']:.3f} ms of CPU per replaced "
              f"item (its new vector under a fresh label, the older one marked deleted), {search['merge']['added']:.3f} ms "
              f"per added one; once the graph's room for marked elements is spent, {search['merge']['replaced (room spent)']:.3f} "
              f"ms per replaced item (its vector updated in place) and {search['merge']['added (room spent)']:.3f} ms per "
              "added one (into a marked element's place)."]
    size = f"{n // 1_000_000}M" if n % 1_000_000 == 0 else f"{n:,}"
    body = f"## Catalogue scale ({size} items)\n\n" + "\n".join(lines)
    print(body)
    if not args.no_write:
        update_section("catalog-scale", body, args.docs / BENCHMARKS.name)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--items", type=int, default=1_000_000, help="catalogue size of a newly built bundle")
    p.add_argument("--users", type=int, default=20_000, help="users of a newly built bundle (20 interactions each)")
    p.add_argument("--epochs", type=int, default=1, help="two-tower epochs of a newly built bundle (0: untrained)")
    p.add_argument("--ef-construction", type=int, default=200, help="HNSW build beam of a newly built bundle")
    p.add_argument("--bundle-dir", type=Path, default=Path("/tmp/catalog-scale"), help="reused while it holds a bundle")
    p.add_argument("--rebuild", action="store_true", help="build a new bundle even if --bundle-dir holds one")
    p.add_argument("--runs", type=int, default=3, help="hey runs per request kind (median reported)")
    p.add_argument("--seconds", type=int, default=10, help="length of each hey run")
    p.add_argument("--queries", type=int, default=200, help="users for the in-process filtered-search comparison")
    p.add_argument("--passes", type=int, default=3, help="timing passes over those users (median reported)")
    p.add_argument("--old-queries", type=int, default=3, help="users for the (slow) pre-change search")
    p.add_argument("--merge-rows", type=int, default=300, help="replaced and added items timed into the graph")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-write", action="store_true", help="print the section, do not write docs/benchmarks.md")
    add_docs_option(p)
    args = p.parse_args()
    if args.rebuild or not (args.bundle_dir / CURRENT).exists():
        build_bundle(args.bundle_dir, args)
    build = json.loads((args.bundle_dir / "build.json").read_text())
    search = in_process(args.bundle_dir, args)
    service = serve(args.bundle_dir, args)
    write(build, search, service, args)


if __name__ == "__main__":
    main()
