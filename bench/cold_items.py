"""The cold-item protocol: items nobody had interacted with when the model was trained, added later through the
catalogue path, and how they rank for the users who then interact with them.

- A global time cut (the ``--cut`` quantile of interaction times). Cold items: items whose first interaction
  comes after it; on synthetic data, whose interactions are spread evenly in time, a seeded ``--release``
  share of the items is also "released" at the cut (their earlier interactions dropped, as if they did not
  exist yet). Cold items are withheld from training entirely: not in the catalogue, not in any history.
- Two bundles per seed are trained on the interactions before the cut: metadata only (``--no-item-text``,
  what the service did before item text) and metadata + text. Each is loaded by the service's engine, and the
  cold items are added through ``CatalogChanges`` (what ``PUT /admin/items`` runs: text encoded at upsert).
- Every user who interacts with a cold item after the cut is scored over every item (warm and cold, exact
  inner product of the served user vector, their pre-cut history excluded) and each of their post-cut items
  is ranked among all of them. Cold targets: Recall@20, Recall@100 and the median rank. Warm targets of the
  same users (post-cut interactions with warm items): Recall@20, so a text model that pays for cold items with
  warm ones shows it. Two more rankers of the same candidates: a content-only kNN (cosine of the item's
  sentence vector to the mean sentence vector of the user's last 20 items) and popularity (train counts;
  cold items tie at 0, ties broken at random).

    python -m bench.cold_items --dataset movielens --seeds 0 1 2
    python -m bench.cold_items --dataset synthetic --seeds 0 1 2      # 2000x1000 with topic text
"""
from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from bench.report import add_docs_option, machine, update_section
from offline.evaluate import paired_bootstrap
from offline.pipeline import IndexConfig, run_training
from offline.ranker import RankerConfig
from offline.train_recall import RecallConfig
from recsys.bundle import read_bundle
from recsys.dataset import Dataset, FeatureTable, ItemTable
from recsys.engine.engine import Engine
from recsys.query import Item
from recsys.text import TextEncoder

EVALUATION = "evaluation.md"
ARMS = ("metadata only", "metadata + text", "content kNN", "popularity")
RECENT = 20


def cold_split(ds: Dataset, cut_quantile: float, release: float, seed: int) -> tuple[Dataset, np.ndarray, float]:
    """``(the training data: interactions before the cut over warm items only, the cold item rows of ds, the cut)``."""
    inter = ds.interactions
    cut = float(np.quantile(inter.timestamp, cut_quantile))
    first = np.full(ds.n_items, np.inf)
    np.minimum.at(first, inter.item, inter.timestamp.astype(np.float64))
    cold = first >= cut
    if release:
        rng = np.random.default_rng(seed)
        cold[rng.choice(ds.n_items, int(release * ds.n_items), replace=False)] = True
    cold &= np.isin(np.arange(ds.n_items), inter.item[inter.timestamp >= cut])  # only items someone meets later
    warm = np.flatnonzero(~cold)
    keep = (inter.timestamp < cut) & ~cold[inter.item]
    new_row = np.full(ds.n_items, -1)
    new_row[warm] = np.arange(len(warm))
    train = inter.subset(keep)
    train = replace(train, item=new_row[train.item])
    return replace(ds, interactions=train, item_ids=[ds.item_ids[i] for i in warm], items=_items(ds.items, warm)), np.flatnonzero(cold), cut


def _items(items: ItemTable, rows: np.ndarray) -> ItemTable:
    extra = FeatureTable(len(rows), {k: v[rows] for k, v in items.extra.categorical.items()}, items.extra.vocab,
                         {k: v[rows] for k, v in items.extra.numeric.items()})
    return ItemTable([items.titles[i] for i in rows], items.year[rows], items.genres[rows], items.genre_names, extra,
                     {c: [v[i] for i in rows] for c, v in items.text.items()})


def catalogue_items(ds: Dataset, rows: np.ndarray) -> list[Item]:
    """Cold items as an operator sends them: title, genres, year, description (and any other text column)."""
    items = ds.items
    out = []
    for r in rows:
        text = {c: v[r] for c, v in items.text.items() if c != "title"}
        out.append(Item(ds.item_ids[r], items.titles[r], [g for g, on in zip(items.genre_names, items.genres[r]) if on],
                        None if not np.isfinite(items.year[r]) else int(items.year[r]),
                        {c: v for c, v in text.items() if c != "description"}, text.get("description", "")))
    return out


def train(ds: Dataset, out: Path, seed: int, text: bool, epochs: int | None = None, id_dropout: float | None = None) -> Path:
    """The pipeline's defaults for the two-tower; a single quick ranker (the protocol scores the recall stage)."""
    options = {k: v for k, v in (("epochs", epochs), ("id_dropout", id_dropout)) if v is not None}
    cfg = RecallConfig(seed=seed, item_text=text, **options)
    return run_training(ds, out, cfg, IndexConfig(), baselines=False, refit=False,
                        ranker_cfg=RankerConfig(losses="lambdarank", lambdamart=False, epochs=5, seed=seed))


def served(path: Path, ds: Dataset, cold_rows: np.ndarray) -> Engine:
    engine = Engine(read_bundle(path))
    changes = engine.changes
    changes.live.commit(changes.prepare(catalogue_items(ds, cold_rows)))
    return engine


def targets(ds: Dataset, cut: float, cold_rows: np.ndarray) -> dict[str, tuple[set, set]]:
    """Per user met after the cut who meets a cold item: (cold item ids, warm item ids) they interact with."""
    inter = ds.interactions
    after = inter.timestamp >= cut
    cold = np.zeros(ds.n_items, bool)
    cold[cold_rows] = True
    out: dict[str, tuple[set, set]] = {}
    for u, i in zip(inter.user[after], inter.item[after]):
        entry = out.setdefault(ds.user_ids[u], (set(), set()))
        entry[0 if cold[i] else 1].add(ds.item_ids[i])
    return {u: t for u, t in out.items() if t[0]}


def rank_all(engine: Engine, users: list[str]) -> tuple[list[str], np.ndarray, list]:
    """The ids in catalogue row order, each user's two-tower scores over them (seen items at -inf), and the users'
    contexts as the engine resolves them (pre-cut histories)."""
    catalog = engine.catalog
    ctxs = [engine.users.resolve(u, None, None) for u in users]
    return catalog.ids, unseen(engine.users.vectors(ctxs) @ catalog.vectors.T, ctxs), ctxs


def unseen(scores: np.ndarray, ctxs: list) -> np.ndarray:
    """``scores`` (a row per user, a column per catalogue row) with each user's history at -inf."""
    for row, ctx in enumerate(ctxs):
        scores[row, ctx.hist_items] = -np.inf
    return scores


def content_scores(text_engine: Engine, ctxs: list) -> np.ndarray:
    """Cosine of every item's sentence vector to the mean vector of the user's last ``RECENT`` items."""
    text = text_engine.catalog.arrays["item_text"].astype(np.float32)
    profiles = np.stack([text[ctx.hist_items[-RECENT:]].mean(0) if len(ctx.hist_items) else np.zeros(text.shape[1], np.float32)
                         for ctx in ctxs])
    return unseen(profiles @ text.T, ctxs)


def measure(scores: np.ndarray, ids: list[str], wanted: list[tuple[set, set]], rng) -> dict[str, np.ndarray]:
    """Per user: cold Recall@20/@100, the median rank (1 = top) of their cold items, warm Recall@20."""
    tie = rng.random(scores.shape[1])
    column = {i: j for j, i in enumerate(ids)}
    out = {k: np.zeros(len(wanted)) for k in ("cold_recall@20", "cold_recall@100", "cold_median_rank", "warm_recall@20")}
    for u, (cold, warm) in enumerate(wanted):
        order = np.lexsort((tie, -scores[u]))
        rank = np.empty(len(order), np.int64)
        rank[order] = np.arange(1, len(order) + 1)
        cold_ranks = rank[[column[i] for i in cold]]
        out["cold_recall@20"][u] = np.mean(cold_ranks <= 20)
        out["cold_recall@100"][u] = np.mean(cold_ranks <= 100)
        out["cold_median_rank"][u] = np.median(cold_ranks)
        warm_cols = [column[i] for i in warm if i in column]
        out["warm_recall@20"][u] = np.mean(rank[warm_cols] <= 20) if warm_cols else np.nan
    return out


def run_seed(ds: Dataset, args, seed: int, tmp: Path) -> dict[str, dict[str, np.ndarray]]:
    train_ds, cold_rows, cut = cold_split(ds, args.cut, args.release, seed)
    started = time.monotonic()
    bundles = {text: train(train_ds, tmp / f"seed{seed}-{'text' if text else 'meta'}", seed, text, args.epochs, args.id_dropout)
               for text in (False, True)}
    engines = {text: served(path, ds, cold_rows) for text, path in bundles.items()}
    wanted = targets(ds, cut, cold_rows)
    users = sorted(wanted)
    lists = [wanted[u] for u in users]
    per_arm = {}
    for text, name in ((False, "metadata only"), (True, "metadata + text")):
        ids, scores, ctxs = rank_all(engines[text], users)
        per_arm[name] = measure(scores, ids, lists, np.random.default_rng(seed))
    # the text engine's ids and contexts (the last of the loop) for the two rankers that need no tower
    per_arm["content kNN"] = measure(content_scores(engines[True], ctxs), ids, lists, np.random.default_rng(seed))
    pop = engines[True].catalog.arrays["popularity"].astype(np.float64)
    per_arm["popularity"] = measure(unseen(np.repeat(pop[None], len(users), 0), ctxs), ids, lists,
                                    np.random.default_rng(seed))
    print(f"seed {seed}: {len(cold_rows)} cold items, {len(users)} users, {time.monotonic() - started:.0f}s "
          f"{ {a: round(float(np.mean(m['cold_recall@100'])), 4) for a, m in per_arm.items()} }", flush=True)
    per_arm["_info"] = {"cold_items": len(cold_rows), "users": len(users), "cold_targets": sum(len(c) for c, _ in lists),
                        "warm_items": train_ds.n_items}
    return per_arm


def write(name: str, results: list[dict], args, seconds: float) -> str:
    info = results[0]["_info"]
    lines = [f"## Cold items: {name}", "",
             f"{machine()}; `python -m bench.cold_items --dataset {args.dataset} --seeds {' '.join(map(str, args.seeds))}"
             + (f" --epochs {args.epochs}" if args.epochs else "")
             + (f" --id-dropout {args.id_dropout}" if args.id_dropout is not None else "") + "` "
             f"({seconds / 60:.0f} min). Cut at the {args.cut:.0%} quantile of interaction times"
             + (f", plus {args.release:.0%} of the items released at the cut" if args.release else "")
             + f". Seed {args.seeds[0]}: {info['cold_items']} cold items withheld from training, added through the catalogue "
             f"path; {info['users']} users meet them after the cut ({info['cold_targets']} user-item pairs); "
             f"{info['warm_items']} warm items. Each user's post-cut items ranked among all items (exact scores, seen items "
             "excluded); mean over users, then mean over seeds [min, max].", "",
             "| ranker | cold Recall@20 | cold Recall@100 | cold median rank | warm Recall@20 |", "|---|---|---|---|---|"]
    for arm in ARMS:
        cells = []
        for metric in ("cold_recall@20", "cold_recall@100", "cold_median_rank", "warm_recall@20"):
            per_seed = [float(np.nanmean(r[arm][metric])) for r in results]
            fmt = "{:.0f}" if "rank" in metric else "{:.4f}"
            cells.append(f"{fmt.format(np.mean(per_seed))} [{fmt.format(min(per_seed))}, {fmt.format(max(per_seed))}]")
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    lines += ["", "Text minus metadata only, per seed (paired bootstrap over users, 95%):", ""]
    for seed, r in zip(args.seeds, results):
        parts = []
        for metric in ("cold_recall@100", "warm_recall@20"):
            a, b = r["metadata + text"][metric], r["metadata only"][metric]
            ok = np.isfinite(a) & np.isfinite(b)
            d = paired_bootstrap(a[ok], b[ok])
            parts.append(f"{metric} {d['mean']:+.4f} [{d['lo']:+.4f}, {d['hi']:+.4f}]")
        lines.append(f"- seed {seed}: " + "; ".join(parts))
    return "\n".join(lines)


def load(args) -> tuple[Dataset, str]:
    from offline import data, synthetic

    if args.dataset == "movielens":
        return data.load_movielens(None), "MovieLens-100K (titles)"
    n_users, n_items = (int(x) for x in args.size.split("x"))
    return (synthetic.generate(n_users=n_users, n_items=n_items, seed=args.data_seed, text=True),
            f"synthetic {args.size} with topic text")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", choices=("movielens", "synthetic"), default="movielens")
    p.add_argument("--size", default="2000x1000", help="USERSxITEMS of the synthetic data")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--cut", type=float, default=0.8, help="quantile of interaction times where training ends")
    p.add_argument("--release", type=float, default=None, help="share of items released at the cut (default: 0.1 on "
                   "synthetic data, 0 on MovieLens, whose late films are cold by themselves)")
    p.add_argument("--epochs", type=int, help="two-tower maximum epochs (default: the pipeline's; the smoke run uses 1)")
    p.add_argument("--id-dropout", type=float, help="--recall-id-dropout of both bundles (default: the pipeline's)")
    p.add_argument("--no-write", action="store_true")
    add_docs_option(p)
    args = p.parse_args(argv)
    if args.release is None:
        args.release = 0.1 if args.dataset == "synthetic" else 0.0
    TextEncoder()  # fetch the model before any timing
    ds, name = load(args)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="cold-items-") as tmp:
        results = [run_seed(ds, args, seed, Path(tmp)) for seed in args.seeds]
    body = write(name, results, args, time.monotonic() - started)
    print(body)
    if not args.no_write:
        suffix = "" if args.id_dropout is None else f"-id-dropout-{args.id_dropout:g}"
        update_section(f"cold-items-{args.dataset}{suffix}", body, args.docs / EVALUATION)


if __name__ == "__main__":
    main()
