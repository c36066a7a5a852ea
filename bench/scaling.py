"""Offline cost against data size: time and peak memory of every training stage on synthetic data.

Each size trains in a fresh process (so one size's memory never counts against the next) with the
configuration the scaling question is about: one two-tower epoch, no classical baselines, one
ranker loss (LambdaRank), the default index and evaluation settings. Stages are timed by
``offline.stages``; peak memory is the kernel's resident high-water mark inside each stage.

    python bench/scaling.py                      # 1M, 3M, 10M interactions; writes docs/benchmarks.md
    python bench/scaling.py --sizes 2000x2000x50 --no-write   # a quick look
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.report import BENCHMARKS, add_docs_option, machine, update_section  # noqa: E402

SIZES = ("10000x10000x100", "30000x30000x100", "100000x100000x100")
STAGES = ("data", "split", "two-tower", "two-tower epoch", "validation", "index build", "index recall check",
          "item statistics", "ranker queries", "ranker training", "evaluation", "export")
PLOT = BENCHMARKS.parent / "scaling.png"


def run_one(size: str, out: Path, threads: int) -> dict:
    """Generate and train one size in this process; returns its stages and totals."""
    from offline import stages
    from offline.pipeline import IndexConfig, run_training
    from offline.ranker import RankerConfig
    from offline.synthetic import generate
    from offline.train_recall import RecallConfig

    n_users, n_items, per_user = (int(x) for x in size.split("x"))
    started = time.perf_counter()
    with stages.stage("data"):
        ds = generate(n_users=n_users, n_items=n_items, interactions_per_user=per_user, seed=0)
    # --no-refit: the refits run the "two-tower epoch" stage again on the same data (the same linear cost
    # per interaction), and keeping them out keeps these rows comparable with the earlier ones
    run_training(ds, out, RecallConfig(epochs=1, threads=threads), IndexConfig(), baselines=False,
                 ranker_cfg=RankerConfig(losses="lambdarank", lambdamart=False), refit=False)
    recorded = stages.recorded()
    return {"size": size, "users": n_users, "items": n_items, "interactions": len(ds.interactions),
            "seconds": time.perf_counter() - started, "stages": recorded,
            "peak_bytes": max(s["peak_bytes"] for s in recorded.values())}


def run_in_subprocess(size: str, threads: int) -> dict:
    """``run_one`` in a fresh interpreter, its result read back as JSON."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        subprocess.run([sys.executable, __file__, "--one", size, "--out", tmp, "--json", str(result),
                        "--threads", str(threads)], check=True)
        return json.loads(result.read_text())


def growth(rows: list[dict], stage: str, key: str) -> float:
    """(cost per interaction at the largest size) / (at the smallest): 1.0 is linear, above it faster."""
    first, last = rows[0], rows[-1]
    a, b = first["stages"].get(stage, {}).get(key), last["stages"].get(stage, {}).get(key)
    if not a or not b:
        return float("nan")
    return (b / last["interactions"]) / (a / first["interactions"])


def markdown(rows: list[dict], threads: int) -> str:
    present = [s for s in STAGES if any(s in r["stages"] for r in rows)]
    head = "| stage | " + " | ".join(f"{r['interactions'] / 1e6:.2f}M: s / GiB" for r in rows) + \
        " | time growth | memory growth |"
    lines = [
        "## Scaling with the data (offline)",
        "",
        f"Machine: {machine()}; torch threads: {threads or 'default'}. `python bench/scaling.py`: synthetic data "
        "(`offline/synthetic.py`, about 100 interactions per user, users = items), one two-tower epoch, no classical "
        "baselines, one ranker loss (LambdaRank), default index and evaluation settings (validation, the index check "
        "and the test report score a seeded sample of 20,000 users). One run per size, each in a fresh process. "
        "Peak memory is the resident high-water mark inside the stage (the process's own, torch and numpy included). "
        "Growth = cost per interaction at the largest size / at the smallest: 1.0 is linear, the target is <= 1.5.",
        "",
        "| size (users x items) | interactions | total s | peak GiB |",
        "|---|---|---|---|",
        *[f"| {r['users']:,} x {r['items']:,} | {r['interactions']:,} | {r['seconds']:.0f} | {r['peak_bytes'] / 2**30:.2f} |"
          for r in rows],
        "",
        head,
        "|---" * (len(rows) + 3) + "|",
    ]
    for s in present:
        cells = [f"{r['stages'][s]['seconds']:.1f} / {r['stages'][s]['peak_bytes'] / 2**30:.2f}" if s in r["stages"] else "-"
                 for r in rows]
        lines.append(f"| {s} | " + " | ".join(cells) + f" | {growth(rows, s, 'seconds'):.2f} | {growth(rows, s, 'peak_bytes'):.2f} |")
    lines += ["", f"![time and peak memory per stage against interactions]({PLOT.name})"]
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["interactions"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for s in STAGES:
        if all(s in r["stages"] for r in rows):
            axes[0].plot(x, [r["stages"][s]["seconds"] for r in rows], marker="o", label=s)
            axes[1].plot(x, [r["stages"][s]["peak_bytes"] / 2**30 for r in rows], marker="o", label=s)
    axes[0].plot(x, [x_ / x[0] * rows[0]["seconds"] for x_ in x], "k--", label="linear from the smallest total")
    for ax, label in zip(axes, ("seconds", "peak resident GiB")):
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("interactions")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default=",".join(SIZES), help="USERSxITEMSxPER_USER, comma-separated")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--no-write", action="store_true", help="print, do not update docs/benchmarks.md")
    add_docs_option(parser)
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--json", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        args.json.write_text(json.dumps(run_one(args.one, args.out, args.threads)))
        return
    rows = []
    for size in args.sizes.split(","):
        rows.append(run_in_subprocess(size, args.threads))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "stages"}), flush=True)
    body = markdown(rows, args.threads)
    print(body)
    if not args.no_write:
        plot(rows, args.docs / PLOT.name)
        update_section("scaling", body, args.docs / BENCHMARKS.name)
        (args.docs / "scaling.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
