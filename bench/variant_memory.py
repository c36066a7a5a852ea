"""Memory per extra bundle: an experiment whose variants name other bundle versions keeps each loaded beside
the live one (index, towers, ranker, tables, with the catalogue changes applied). This measures what each
costs: the resident memory of one process serving the live bundle, then after each experiment that adds a
version, and after deleting them (the extra engines are dropped; what the allocator returns to the system is
shown, not assumed).

    python -m bench.variant_memory --bundle artifacts --extra 2
"""
from __future__ import annotations

import argparse
import gc
import shutil
import tempfile
from pathlib import Path

from bench.report import BENCHMARKS, add_docs_option, machine, update_section
from recsys.bundle import resolve
from recsys.experiments.definition import Experiment, Variant
from recsys.live import LiveConfig, LiveEngine
from recsys.state.open import StoreConfig


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def bundle_mib(path: Path) -> float:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) / 2**20


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bundle", type=Path, required=True, help="a bundle root or version directory")
    p.add_argument("--extra", type=int, default=2, help="extra versions to load, one experiment each")
    p.add_argument("--no-write", action="store_true")
    add_docs_option(p)
    args = p.parse_args()
    source = resolve(args.bundle)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "artifacts"
        root.mkdir()
        for name in ["live", *(f"extra-{i}" for i in range(args.extra))]:
            shutil.copytree(source, root / name)
        (root / "current").write_text("live")
        live = LiveEngine(LiveConfig(root, StoreConfig("file", Path(tmp) / "state"), impressions=None))
        gc.collect()
        rows = [("live bundle only", rss_mib())]
        for n in range(1, args.extra + 1):  # the experiment redefined with one more version each time
            share = 1 / (n + 1)
            variants = [Variant("control", 1 - n * share), *(Variant(f"v{i}", share, bundle=f"extra-{i}") for i in range(n))]
            live.define_experiment(Experiment("bundles", tuple(variants)))
            gc.collect()
            rows.append((f"+ {n} extra version{'s' * (n > 1)} loaded", rss_mib()))
        live.delete_experiment("bundles")
        gc.collect()
        rows.append(("experiment deleted (extra engines dropped)", rss_mib()))
        size = bundle_mib(source)
        live.close()
    loaded = [mib for name, mib in rows if name.startswith("+")]
    per_extra = (loaded[-1] - rows[0][1]) / len(loaded)
    lines = [f"Machine: {machine()}. Bundle `{args.bundle}` ({size:.1f} MiB on disk). Resident memory (VmRSS) of one "
             "process with a live engine on the file backend, impressions off.", "",
             "| state | RSS (MiB) | vs live only |", "|---|---|---|",
             *[f"| {name} | {mib:,.0f} | {mib - rows[0][1]:+,.0f} |" for name, mib in rows], "",
             f"An extra bundle costs about {per_extra:,.0f} MiB here ({per_extra / size:.1f}x its size on disk): a full "
             "engine (HNSW index, tower, ranker, feature tables, its own catalogue snapshot). Only the versions that "
             "running experiments name are loaded; deleting the experiment drops them."]
    body = "## Memory per extra bundle (experiment variants)\n\n" + "\n".join(lines)
    print(body)
    if not args.no_write:
        update_section("variant-memory", body, args.docs / BENCHMARKS.name)


if __name__ == "__main__":
    main()
