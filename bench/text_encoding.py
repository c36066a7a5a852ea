"""How fast item text is encoded on this CPU, what a catalogue of 100k or 1M items costs to encode, and what text
adds to a catalogue upsert.

- Encoding: all-MiniLM-L6-v2 (recsys/text.py) over three kinds of item text: MovieLens titles, the synthetic
  title + description (~15 words) and long descriptions (~120 words); items/s is the median of ``--repeats``
  passes over ``--n`` texts, after a warm-up, on every core and on one thread. The 100k and 1M times are
  ``items / rate`` (encoding is per item, in fixed-size batches: linear), not runs of that size. A second
  pass through the vector cache shows what a retraining on the same catalogue pays.
- Upserts: a bundle trained with and one without text on the same synthetic data, loaded by the service's
  engine; one item, and a batch of 100, prepared and committed as ``PUT /admin/items`` and
  ``POST /admin/items:batch`` do (in process: the HTTP cost is the same with or without text). Each upsert
  carries a new description, so the encoder really runs.

    python -m bench.text_encoding
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.report import add_docs_option, machine, update_section
from recsys.text import TextEncoder, VectorCache

SECTION = "text-encoding"


def texts_of(kind: str, n: int) -> list[str]:
    from offline import synthetic

    if kind == "MovieLens titles":
        from offline.data import load_movielens

        titles = load_movielens(None).items.titles
        return [f"{titles[i % len(titles)]} #{i}" for i in range(n)]  # distinct texts: no cache hit inside a pass
    ds = synthetic.generate(n_users=10, n_items=n, seed=0, text=True, pool_size=5, interactions_per_user=1)
    if kind == "synthetic title + description":
        return ds.items.item_texts()
    long = [" ".join([d] * 12) for d in ds.items.text["description"]]
    return [f"{t}. {d}" for t, d in zip(ds.items.titles, long)]


def rate(encoder: TextEncoder, texts: list[str], repeats: int, threads: int) -> float:
    """Items per second, median of ``repeats`` passes (the in-process memory cleared before each)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        times = []
        for _ in range(repeats):
            encoder._memory.clear()
            started = time.perf_counter()
            encoder.encode(texts)
            times.append(time.perf_counter() - started)
    finally:
        torch.set_num_threads(before)
    return len(texts) / float(np.median(times))


def cached_rate(encoder: TextEncoder, texts: list[str], tmp: Path) -> float:
    encoder._memory.clear()
    encoder.encode(texts, cache=VectorCache(tmp, encoder.digest))
    encoder._memory.clear()
    started = time.perf_counter()
    encoder.encode(texts, cache=VectorCache(tmp, encoder.digest))  # a new process's cache: read from disk
    return len(texts) / (time.perf_counter() - started)


def upsert_latency(tmp: Path, repeats: int, n_items: int) -> dict[str, dict[int, float]]:
    """Median ms of an upsert of 1 and of 100 new items, by a bundle with and one without text."""
    from offline.pipeline import IndexConfig, run_training
    from offline.ranker import RankerConfig
    from offline.synthetic import generate
    from offline.train_recall import RecallConfig
    from recsys.bundle import read_bundle
    from recsys.engine.engine import Engine
    from recsys.query import Item

    ds = generate(n_users=500, n_items=n_items, seed=0, text=True)
    out = {}
    for text in (False, True):
        path = run_training(ds, tmp / str(text), RecallConfig(epochs=1, item_text=text), IndexConfig(), baselines=False,
                            refit=False, ranker_cfg=RankerConfig(losses="lambdarank", lambdamart=False, epochs=1))
        engine = Engine(read_bundle(path))
        timings: dict[int, list[float]] = {1: [], 100: []}
        serial = 0
        for _ in range(repeats):
            for size in timings:
                items = [Item(f"new-{serial + j}", ds.items.titles[j], ["genre1"], 2001, {},
                              f"{ds.items.text['description'][j]} edition {serial + j}") for j in range(size)]
                serial += size
                started = time.perf_counter()
                engine.changes.live.commit(engine.changes.prepare(items))
                timings[size].append(time.perf_counter() - started)
        out["with text" if text else "without text"] = {size: 1000 * float(np.median(t)) for size, t in timings.items()}
    return out


def write(rates: dict, cached: float, upserts: dict, measured: tuple[int, float] | None, args) -> str:
    lines = ["## Item text: encoding speed and upserts", "", f"{machine()}; `python -m bench.text_encoding` ({args.n} texts per kind, median of {args.repeats} passes, "
             "batches of 64 sorted by length). 100k and 1M: items / rate, extrapolated (encoding is linear in items).", "",
             "| text | threads | items/s | 100k items | 1M items |", "|---|---|---|---|---|"]
    for (kind, threads), r in rates.items():
        lines.append(f"| {kind} | {threads} | {r:,.0f} | {1e5 / r / 60:.1f} min | {1e6 / r / 3600:.2f} h |")
    if measured:
        n, seconds = measured
        lines += ["", f"Measured, not extrapolated: {n:,} synthetic titles + descriptions in one pass, every core: "
                  f"{seconds / 60:.1f} min ({n / seconds:,.0f} items/s)."]
    lines += ["", f"The same synthetic texts again through the on-disk vector cache (a retraining on an unchanged "
              f"catalogue): {cached:,.0f} items/s.", "",
              f"Catalogue upserts (in process, {args.upsert_items:,}-item bundle, median of {max(args.repeats, 5)}; the catalogue "
              "copy is the same "
              "with or without text, but for the text vectors' own rows):", "", "| bundle | 1 item | batch of 100 |", "|---|---|---|"]
    for name, t in upserts.items():
        lines.append(f"| {name} | {t[1]:.1f} ms | {t[100]:.1f} ms |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="texts per kind")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--kinds", nargs="+", default=["MovieLens titles", "synthetic title + description", "long descriptions"])
    p.add_argument("--measure", type=int, default=100_000, help="also encode this many texts in one pass (0 = skip)")
    p.add_argument("--upsert-items", type=int, default=2000, help="catalogue size of the upsert bundles")
    p.add_argument("--no-write", action="store_true")
    add_docs_option(p)
    args = p.parse_args(argv)
    encoder = TextEncoder()
    encoder.encode(["warm up"] * 64)
    rates = {}
    for kind in args.kinds:
        texts = texts_of(kind, args.n)
        for threads in (torch.get_num_threads(), 1):
            rates[(kind, threads)] = rate(encoder, texts, args.repeats, threads)
            print(kind, threads, f"{rates[(kind, threads)]:.0f} items/s", flush=True)
    measured = None
    if args.measure:  # one real pass at catalogue size, beside the extrapolation
        texts = texts_of("synthetic title + description", args.measure)
        encoder._memory.clear()
        started = time.perf_counter()
        encoder.encode(texts)
        measured = (args.measure, time.perf_counter() - started)
        print(f"{args.measure} items encoded in {measured[1]:.0f}s", flush=True)
    with tempfile.TemporaryDirectory(prefix="text-encoding-") as tmp:
        cached = cached_rate(encoder, texts_of("synthetic title + description", args.n), Path(tmp) / "cache")
        upserts = upsert_latency(Path(tmp), max(args.repeats, 5), args.upsert_items)
    body = write(rates, cached, upserts, measured, args)
    print(body)
    if not args.no_write:
        update_section(SECTION, body, args.docs / "benchmarks.md")


if __name__ == "__main__":
    main()
