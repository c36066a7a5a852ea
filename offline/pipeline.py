"""``python -m offline train``: data -> split -> two-tower -> index -> re-ranker -> evaluation -> bundle.

The order of windows (per user, by time): train | valid | test. The two-tower model trains
on train and early-stops on valid; the re-ranker trains on the two-tower's candidates for the
valid window (see offline/train_ranker.py); every reported number is on test, with the
history before it (train + valid) as input, exactly as the service would see it.
"""
from __future__ import annotations

import importlib.util
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import hnswlib
import numpy as np
from loguru import logger

from offline.clicks import Clicks
from offline.config import config_option
from offline.data import dataset_fingerprint
from offline.evaluate import BLEND, baseline_models, evaluate, paired_bootstrap, report_rows, tune, write_report
from offline.item_stats import ranker_arrays
from offline.ranker import RankerConfig
from offline.split import TemporalSplit, seeded_sample, temporal_split
from offline.stages import stage
from recsys.bundle import Bundle, write_bundle
from recsys.dataset import Dataset, Interactions
from recsys.rank_features import RankerTables
from recsys.scorer import load_ranker
from offline.train_ranker import (RERANKED, MergedCandidates, RankContext, RankingResult, RerankRecommender, rerankers,
                                  train_rankers)
from offline.distributed import from_rank0, world
from offline.recall_eval import TwoTowerRecommender, build_index, exact_topk
from offline.tower_tables import TowerTables
from offline.train_recall import RecallConfig, chosen_epochs, deterministic_torch, refit_two_tower, train_two_tower
from offline.two_tower import TwoTower


EVAL_USERS = 20_000  # users scored per window by default: full ranking costs users x items
REFIT = "refit on train+valid"  # report-name suffix of the served models' scoreable twin
REFERENCES = ("two-tower (hnsw)", "ease-recency", BLEND)  # what every re-ranker's test NDCG is compared with


@dataclass
class IndexConfig:
    m: int = config_option(16, "HNSW graph degree M (memory and recall grow with it)", positive=True)
    ef_construction: int = config_option(200, "HNSW build-time beam width", positive=True)
    insert_ef_construction: int = config_option(100, "HNSW beam width of the insertions a replica makes for items "
                                                "added or changed online, which it sets the cost of (at 1M items "
                                                "0.29 ms an item at 100, 0.19 at 64, 0.50 at 200; a replica may "
                                                "override it: RECSYS_INDEX_INSERT_EF)", positive=True)
    ef: int = config_option(256, "HNSW query-time beam width (>= candidates for full recall)", positive=True)
    candidates: int = config_option(200, "recall depth handed to the re-ranker; index recall is reported at it")
    item_item_candidates: int = config_option(0, "items the item-item channel (the recent items' neighbours, by "
                                              "recency-weighted neighbour weight) adds to the two-tower's candidates "
                                              "before re-ranking, those the tower missed; 0 = two-tower only (on "
                                              "MovieLens 100 moved the re-ranked metrics less than their seed "
                                              "spread: docs/evaluation.md)")
    build_threads: int = config_option(1, "threads that insert items into the exported index; more than 1 is faster on "
                                       "a big catalogue, but the graph then depends on thread scheduling and two runs "
                                       "with the same seed can export different indexes and metrics")


def run_training(ds: Dataset, out: Path, recall_cfg: RecallConfig, index_cfg: IndexConfig,
                 valid_frac: float = 0.1, test_frac: float = 0.1, baselines: bool = True, resume: bool = False,
                 ranker_cfg: RankerConfig | None = None, promote: bool = True, eval_users: int = EVAL_USERS,
                 refit: bool = True, clicks: Clicks | None = None) -> Path | None:
    """Train every stage, evaluate against the peers, write the bundle and its report; returns the bundle path.
    Under torchrun (offline/distributed.py) every rank trains the two-tower models and rank 0 alone
    goes on and returns the path; the other ranks return None after training.
    On CPU the same data, seed and thread count give the same bundle metrics (deterministic torch
    kernels, seeded single-threaded index builds, seeded generators). ``eval_users``: validation,
    the index check and the report score a seeded sample of that many users (0 = all). ``refit``:
    serve a two-tower and item statistics refit on every interaction (see ``_run_training``). ``clicks``: the
    re-ranker learns from the service's impressions too (offline/clicks.py)."""
    with deterministic_torch(recall_cfg.threads):
        return _run_training(ds, out, recall_cfg, index_cfg, valid_frac, test_frac, baselines, resume,
                             ranker_cfg or RankerConfig(), promote, eval_users, refit, clicks)


@dataclass
class Recall:
    """A two-tower model with what serving it takes: its item vectors and index, and the bundle arrays
    whose item statistics (popularity, ratings, neighbours) come from the window it trained on."""

    model: TwoTower
    vectors: np.ndarray
    index: hnswlib.Index
    arrays: dict[str, np.ndarray]

    @classmethod
    def build(cls, ds: Dataset, split: TemporalSplit, tables: TowerTables, model: TwoTower, cfg: IndexConfig,
              seed: int) -> "Recall":
        vectors = tables.item_vectors(model)
        with stage("index build"):
            index = build_index(vectors, cfg.m, cfg.ef_construction, cfg.ef, threads=cfg.build_threads, seed=seed)
        with stage("item statistics"):
            arrays = bundle_arrays(ds, split, tables, vectors)
            arrays["item_content_vectors"] = tables.item_vectors(model, content_only=True)
        return cls(model, vectors, index, arrays)

    def context(self, tables: TowerTables, cfg: IndexConfig, name: str | None = None) -> RankContext:
        """What the re-ranker's requests read: this model through its index, and its arrays."""
        return RankContext(TwoTowerRecommender(self.model, tables, self.index, name), RankerTables.from_arrays(self.arrays),
                           self.arrays, cfg.candidates, cfg.item_item_candidates)


def _run_training(ds: Dataset, out: Path, recall_cfg: RecallConfig, index_cfg: IndexConfig, valid_frac: float,
                  test_frac: float, baselines: bool, resume: bool, ranker_cfg: RankerConfig, promote: bool,
                  eval_users: int, refit: bool, clicks: Clicks | None) -> Path | None:
    """The stages of ``run_training``, in order, each timed and its peak memory recorded (offline/stages.py).

    Model selection uses the held-out windows: the two-tower trains on train and early-stops on valid,
    the re-ranker learns from the valid window. With ``refit`` the two-tower is then retrained from the
    same seed for the chosen epoch count twice: on train + valid (its item statistics too), the twin
    scored on test through the same re-ranker, which is what the served model's numbers honestly are;
    and on every interaction, the model the bundle serves. The re-ranker is not retrained: its labels
    must be interactions the tower never saw, and in training (valid window, train-window tower), on
    test (test window, train + valid twin) and in service (the future, the refit on everything) it
    scores a tower and statistics fit on exactly the interactions before the ones it ranks."""
    started = time.perf_counter()
    with stage("split"):
        split = temporal_split(ds.interactions, ds.n_users, ds.n_items, valid_frac, test_frac, eval_users)
    fingerprint = dataset_fingerprint(ds)
    run_dir = out / "runs" / fingerprint[:12]
    with stage("two-tower"):
        model, tables, history = train_two_tower(ds, split, recall_cfg, run_dir, resume=resume)
    epochs = from_rank0(chosen_epochs(history, recall_cfg) if world().is_main else 0, tables.device)
    wider = {upto: split.refit(upto) for upto in (("test", "serve") if refit else ())}
    refits = {}
    for upto, window in wider.items():
        with stage(f"two-tower refit ({upto})"):
            refits[upto] = refit_two_tower(window, recall_cfg, tables, epochs, run_dir / f"refit-{upto}")
    if not world().is_main:
        return None
    train_seconds = time.perf_counter() - started
    first = Recall.build(ds, split, tables, model, index_cfg, recall_cfg.seed)
    ctx = first.context(tables, index_cfg)
    ranking = train_rankers(ctx, split, ranker_cfg, clicks)
    twin = served = first
    if refit:
        twin, served = (Recall.build(ds, wider[w], tables, refits[w], index_cfg, recall_cfg.seed) for w in ("test", "serve"))
    with stage("index recall check"):
        index_recall = index_recall_at_depth(served.index, served.vectors, tables, served.model, split, index_cfg.candidates)
    logger.info("HNSW recall@{} vs exact: {:.4f}", index_cfg.candidates, index_recall)
    with stage("evaluation"):
        models = (baseline_models(split) + peer_models(split)) if baselines else []
        models += [(TwoTowerRecommender(model, tables), asdict(recall_cfg)), (ctx.recall, asdict(index_cfg))]
        models += rerankers(ctx, ranking)
        sources = ceiling_sources(ctx, models)
        if refit:
            twin_ctx = twin.context(tables, index_cfg, f"two-tower (hnsw, {REFIT})")
            models += [(twin_ctx.recall, {"epochs": epochs})] + refit_rerankers(twin_ctx, ranking)
            sources.insert(1, (twin_ctx.recall, index_cfg.candidates))
        rows, per_user = report_rows(models, split, "test")
        served_order = (f"{RERANKED}{ranking.default}",) if refit and ranking.default else ()
        comparison = rerank_comparison(per_user, REFERENCES + served_order)
        ceiling = candidate_ceiling(sources, split)
    metrics = {"test": {r["model"]: {k: v for k, v in r.items() if k not in ("model", "params")} for r in rows},
               "candidate_ceiling": ceiling,
               f"index_recall@{index_cfg.candidates}": index_recall, "train_seconds": train_seconds,
               "recall_history": history, "ranker": ranker_summary(ranking, comparison)}
    if clicks is not None:
        metrics["ranker"]["clicks"] = clicks.summary()
    bundle = assemble_bundle(ds, split, tables, served, recall_cfg, index_cfg, ranker_cfg, metrics, fingerprint,
                             ranking.default_state, {"epochs": epochs, "trained_on": "every interaction"} if refit else None)
    if refit:
        bundle.holdout = assemble_bundle(ds, split, tables, twin, recall_cfg, index_cfg, ranker_cfg, metrics, fingerprint,
                                         ranking.default_state, {"epochs": epochs, "trained_on": "train + valid"})
    with stage("export"):
        path = write_bundle(out, bundle, promote)
        extra = {"bundle": path.name, f"index_recall@{index_cfg.candidates} (served index)": index_recall,
                 "candidate ceiling (test recall of each candidate source's list)": {n: round(v, 4) for n, v in ceiling.items()},
                 "two_tower_train_seconds": round(train_seconds, 1), **ranker_report(metrics["ranker"])}
        if clicks is not None:
            extra["ranker learned from clicks (offline/clicks.py)"] = clicks.summary()
        if refit:
            extra["refit"] = (f"the bundle serves a two-tower retrained for {epochs} epochs (the early-stopping choice) "
                              f"and item statistics from every interaction; the '{REFIT}' rows are its twin, refit the "
                              "same way on train + valid and scored on test through the same re-ranker")
        md = write_report(rows, out / "reports" / path.name, f"Evaluation on {ds.name} (test window)", extra)
    logger.info("bundle {} written; report {}", path, md)
    return path


def refit_rerankers(ctx: RankContext, ranking: RankingResult) -> list[tuple[RerankRecommender, dict]]:
    """The bundle's re-ranker over the refit twin's candidates and statistics: what the bundle serves, one
    window earlier."""
    if ranking.default_state is None:
        return []
    return [(RerankRecommender(ctx, load_ranker(ranking.default_state), f"{RERANKED}{ranking.default} ({REFIT})"),
             {"loss": ranking.default})]


def rerank_comparison(per_user: dict[str, dict[str, np.ndarray]], references: tuple[str, ...] = REFERENCES,
                      metric: str = "ndcg@10") -> dict:
    """Per re-ranker: its per-user test ``metric`` minus each reference model's (the recall order it
    re-ranks, the strongest peer when the baselines ran, and with a refit the train-window pipeline)
    on the same users, with a 95% paired bootstrap interval."""
    values = {name: metrics[metric] for name, metrics in per_user.items()}
    out = {}
    for name in (n for n in values if n.startswith(RERANKED)):
        out[name] = {ref: paired_bootstrap(values[name], values[ref]) for ref in references if ref in values and ref != name}
        logger.info("{} test {} minus: {}", name, metric,
                    {r: f"{c['mean']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]" for r, c in out[name].items()})
    return out


def ceiling_sources(ctx: RankContext, models: list[tuple[object, dict]]) -> list[tuple[object, int]]:
    """The candidate lists worth comparing, each with its length: the two-tower at the served depth
    and at the merged list's length (the same budget as the merge), the merged list the re-ranker
    sees, and the strongest classical peers at the served depth when they ran."""
    merged = ctx.depth + ctx.extra
    sources = [(ctx.recall, ctx.depth)]
    if ctx.extra:
        sources += [(ctx.recall, merged), (MergedCandidates(ctx), merged)]
    return sources + [(m, ctx.depth) for m, _ in models if m.name in ("ease-recency", "seqknn", BLEND)]


def candidate_ceiling(sources: list[tuple[object, int]], split: TemporalSplit) -> dict[str, float]:
    """Per candidate source, the test recall of its top ``depth`` items: the most any re-ranker of
    those candidates can find (a positive outside them is lost before ranking)."""
    out = {f"{m.name} @{depth}": evaluate(m, split, "test", ks=(depth,))[f"recall@{depth}"] for m, depth in sources}
    logger.info("candidate ceiling (test recall): {}", {n: round(v, 4) for n, v in out.items()})
    return out


def ranker_report(summary: dict) -> dict:
    """The re-ranker lines of the Markdown report, rounded for reading (the manifest keeps full precision)."""
    def fmt(c: dict) -> str:
        return f"{c['mean']:+.4f} [{c['lo']:+.4f}, {c['hi']:+.4f}]"

    refs = sorted({r for diffs in summary["test_ndcg@10_minus"].values() for r in diffs})
    return {"ranker_default": summary["default"],
            "ranker_valid_ndcg@10 (held-out valid-window users)":
                {"recall order": round(summary["recall_order_valid_ndcg@10"], 4),
                 **{n: round(v, 4) for n, v in summary["valid_ndcg@10"].items()}},
            "ranker_default_choice (valid ndcg@10 difference, 95% CI)": {n: fmt(c) for n, c in summary["default_choice"].items()},
            **{f"test ndcg@10 minus {ref}, mean [95% bootstrap CI over users]":
               {n: fmt(d[ref]) for n, d in summary["test_ndcg@10_minus"].items() if ref in d} for ref in refs},
            "ranker_train_seconds": summary["train_seconds"]}


def ranker_summary(ranking: RankingResult, comparison: dict) -> dict:
    """What the report and the manifest say about the re-ranker stage."""
    return {"default": ranking.default, "candidates_from": "two-tower via the HNSW index",
            "recall_order_valid_ndcg@10": ranking.recall_valid_ndcg,
            "valid_ndcg@10": {n: s["metrics"]["valid_ndcg@10"] for n, s in ranking.states.items()},
            "default_choice": ranking.challenges,
            "test_ndcg@10_minus": comparison,
            "train_seconds": {k: round(v, 1) for k, v in ranking.seconds.items()}}


def peer_models(split: TemporalSplit) -> list:
    """implicit's ALS, tuned on valid, when the dev/eval dependency is installed."""
    from offline.baselines import ALS

    if importlib.util.find_spec("implicit") is None:
        logger.warning("implicit is not installed (pip install -e '.[dev]'): ALS comparison skipped")
        return []
    grid = [{"factors": f, "regularization": r} for f in (32, 64) for r in (0.05, 0.5)]
    return [tune("als", lambda **p: ALS(split, **p), grid, split)]


def index_recall_at_depth(index: hnswlib.Index, item_vectors: np.ndarray, tables: TowerTables, model: TwoTower,
                          split: TemporalSplit, depth: int, seed: int = 0) -> float:
    """Share of the exact top-``depth`` items the index returns, over the serving vectors of every
    user (or a seeded sample of ``split.max_eval_users`` of them)."""
    users = seeded_sample(np.arange(split.n_users), split.max_eval_users, seed)
    serving = split.history_before("serve")
    user_vecs = tables.user_vectors(model, users, [serving[u] for u in users])
    depth = min(depth, len(item_vectors))
    exact = exact_topk(user_vecs, item_vectors, depth, [np.zeros(0, np.int64)] * len(users))
    approx, _ = index.knn_query(user_vecs, k=depth)
    hits = [len(np.intersect1d(a, e)) for a, e in zip(approx, exact)]
    return float(np.sum(hits) / (len(users) * depth))


def bundle_arrays(ds: Dataset, split: TemporalSplit, tables: TowerTables, item_vectors: np.ndarray) -> dict[str, np.ndarray]:
    """Feature tables, item vectors, serving histories and the re-ranker's train-window statistics."""
    inter = ds.interactions.sorted_by_user_time()
    offsets = np.concatenate([[0], np.cumsum(np.bincount(inter.user, minlength=ds.n_users))])
    return {
        "item_vectors": item_vectors.astype(np.float32),
        "user_cat": tables.user_cat, "user_num": tables.user_num,
        "item_genres": tables.item_genres, "item_dense": tables.item_dense, "item_cat": tables.item_cat,
        "item_year": ds.items.year.astype(np.float32),
        "history_offsets": offsets.astype(np.int64), "history_items": inter.item.astype(np.int64),
        "history_ratings": inter.rating.astype(np.float32), "history_timestamps": inter.timestamp.astype(np.int64),
        "popularity": np.bincount(split.train.item, minlength=ds.n_items).astype(np.float32),
        **ranker_arrays(split.train, ds.n_items),
        **({} if tables.item_text is None else {"item_text": tables.item_text}),
    }


def rating_scale(inter: Interactions) -> dict[str, float]:
    """The ratings a bundle understands: the lowest and highest rating in the training data (every
    window, so the service accepts any rating the data held). The service validates ``/events``
    ratings against it. Warns when it leaves 1..5, the range the tower's rating codes
    (``features.history_windows``: rint, clipped to 0..5, 0 = unknown) and the relevance grades
    (``split.relevance``: rating >= 4 is positive) were designed for."""
    low, high = float(inter.rating.min()), float(inter.rating.max())
    if low < 1 or high > 5:
        logger.warning("ratings span {:g}..{:g}; the tower's rating codes clip to 0..5 and rating >= 4 counts as "
                       "positive: rescale the ratings to 1..5 for full use of them", low, high)
    return {"min": low, "max": high}


def assemble_bundle(ds: Dataset, split: TemporalSplit, tables: TowerTables, recall: Recall, recall_cfg: RecallConfig,
                    index_cfg: IndexConfig, ranker_cfg: RankerConfig, metrics: dict, fingerprint: str,
                    ranker: dict | None, refit: dict | None = None) -> Bundle:
    """What the service needs: towers, index, feature tables, serving histories, catalogue, re-ranker."""
    catalog = {"user_ids": ds.user_ids, "item_ids": ds.item_ids, "titles": ds.items.titles,
               "genre_names": ds.items.genre_names, "user_vocab": ds.users.vocab, "item_vocab": ds.items.extra.vocab}
    model, index = recall.model, recall.index
    dim = int(recall.vectors.shape[1])
    manifest = {
        "data_fingerprint": fingerprint, "dataset": ds.name, "implicit": split.implicit,
        "rating_scale": rating_scale(ds.interactions),
        "params": {"recall": asdict(recall_cfg), "index": asdict(index_cfg), "ranker": asdict(ranker_cfg)},
        "metrics": metrics, "model_config": model.config, "feature_spec": tables.spec.to_dict(),
        "index": {"space": "ip", "dim": dim, "m": index_cfg.m,
                  "ef_construction": index_cfg.ef_construction, "insert_ef_construction": index_cfg.insert_ef_construction,
                  "ef": index_cfg.ef, "max_elements": int(index.get_max_elements())},
    }
    if ranker is not None:
        manifest["ranker"] = {"kind": ranker["kind"], "loss": ranker["loss"], "feature_names": ranker["feature_names"]}
    if ds.events_watermark is not None:  # the service serves only the events after it on top of this bundle
        manifest["events_watermark"] = ds.events_watermark
    if refit is not None:
        manifest["refit"] = refit
    return Bundle(manifest, catalog, recall.arrays, model.user_tower, model.item_tower, index, ranker)
