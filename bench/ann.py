"""ANN benchmark: hnswlib against exact search (a BLAS matrix product) on synthetic catalogues.

For each catalogue size: build time, then for several ``ef`` values recall@K against exact
search and single-query latency, both measured in the same run so the ratio is meaningful on
a shared machine. Writes the "ann" section of docs/benchmarks.md and docs/ann.png.

    python bench/ann.py --sizes 100000 1000000
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import hnswlib
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.report import BENCHMARKS, add_docs_option, machine, update_section  # noqa: E402
from offline.synthetic import item_vectors  # noqa: E402


def exact_topk(vectors: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Ground truth and baseline: full inner products, then the top k."""
    scores = queries @ vectors.T
    part = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(scores, part, axis=1), axis=1)
    return np.take_along_axis(part, order, axis=1)


def time_per_query(fn, queries: np.ndarray, repeats: int) -> float:
    """Median seconds per single-query call over ``repeats`` passes over the queries."""
    passes = []
    for _ in range(repeats):
        start = time.perf_counter()
        for q in queries:
            fn(q[None])
        passes.append((time.perf_counter() - start) / len(queries))
    return float(np.median(passes))


def bench_size(n: int, args) -> dict:
    vectors = item_vectors(n + args.queries, args.dim, args.intrinsic_dim, seed=0)
    vectors, queries = vectors[:n], vectors[n:]  # queries: held-out points from the same distribution
    truth = np.concatenate([exact_topk(vectors, queries[i : i + 256], args.k) for i in range(0, len(queries), 256)])
    start = time.perf_counter()
    index = hnswlib.Index(space="ip", dim=args.dim)
    index.init_index(max_elements=n, M=args.m, ef_construction=args.ef_construction)
    index.set_num_threads(args.build_threads)
    index.add_items(vectors, np.arange(n))
    build_s = time.perf_counter() - start
    index.set_num_threads(1)
    timed = queries[: args.timed_queries]
    exact_s = time_per_query(lambda q: exact_topk(vectors, q, args.k), timed, args.repeats)
    rows = []
    for ef in args.ef:
        index.set_ef(max(ef, args.k))
        labels, _ = index.knn_query(queries, k=args.k)
        recall = float(np.mean([len(np.intersect1d(a, t)) / args.k for a, t in zip(labels, truth)]))
        hnsw_s = time_per_query(lambda q: index.knn_query(q, k=args.k), timed, args.repeats)
        rows.append({"ef": max(ef, args.k), "recall": recall, "hnsw_ms": hnsw_s * 1000, "qps": 1 / hnsw_s,
                     "speedup": exact_s / hnsw_s})
        print(f"n={n} ef={ef} recall@{args.k}={recall:.4f} hnsw={hnsw_s*1e3:.3f}ms exact={exact_s*1e3:.2f}ms x{exact_s/hnsw_s:.0f}")
    return {"n": n, "build_s": build_s, "exact_ms": exact_s * 1000, "exact_qps": 1 / exact_s, "rows": rows}


def markdown(results: list[dict], args) -> str:
    lines = [
        "## ANN: hnswlib vs exact search",
        "",
        f"Machine: {machine()}. Synthetic clustered unit vectors, dim {args.dim} (latent dim {args.intrinsic_dim}, "
        "like learned embeddings whose variance sits in few directions; queries are held-out points), inner product, "
        f"M={args.m}, ef_construction={args.ef_construction} (built with {args.build_threads} threads). "
        f"Latency: one query per call, one thread, median of {args.repeats} passes over {args.timed_queries} queries; "
        f"recall@{args.k} over {args.queries} queries against exact top-{args.k}. Exact = BLAS matrix product + argpartition "
        "(the machine's BLAS threads), timed in the same run. Produced by `python bench/ann.py`.",
        "",
        "| items | build (s) | exact ms/query | ef | recall@%d | HNSW ms/query | HNSW QPS | speed-up vs exact |" % args.k,
        "|---|---|---|---|---|---|---|---|",
    ]
    for res in results:
        for r in res["rows"]:
            lines.append(f"| {res['n']:,} | {res['build_s']:.1f} | {res['exact_ms']:.2f} | {r['ef']} | {r['recall']:.4f} | "
                         f"{r['hnsw_ms']:.3f} | {r['qps']:.0f} | {r['speedup']:.0f}x |")
    lines += ["", "![recall vs latency](ann.png)"]
    return "\n".join(lines)


def plot(results: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for res in results:
        ax.plot([r["recall"] for r in res["rows"]], [r["qps"] for r in res["rows"]], marker="o", label=f"HNSW, {res['n']:,} items")
        ax.axhline(res["exact_qps"], linestyle="--", color=ax.lines[-1].get_color(), label=f"exact, {res['n']:,} items")
    ax.set_xlabel("recall@100")
    ax.set_ylabel("queries / second (1 thread)")
    ax.set_yscale("log")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--intrinsic-dim", type=int, default=16, help="latent dimension of the synthetic vectors")
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--ef-construction", type=int, default=200)
    p.add_argument("--ef", type=int, nargs="+", default=[100, 200, 400, 800])
    p.add_argument("--queries", type=int, default=1000, help="queries for recall")
    p.add_argument("--timed-queries", type=int, default=200, help="queries timed one by one")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--build-threads", type=int, default=2)
    add_docs_option(p)
    p.add_argument("--no-write", action="store_true", help="print the section, write neither it nor the plot")
    args = p.parse_args()
    results = [bench_size(n, args) for n in args.sizes]
    body = markdown(results, args)
    print(body)
    if not args.no_write:
        plot(results, args.docs / "ann.png")
        update_section("ann", body, args.docs / BENCHMARKS.name)


if __name__ == "__main__":
    main()
