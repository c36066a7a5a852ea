"""``python -m offline train``: data -> split -> two-tower -> index -> evaluation -> bundle.

The order of windows (per user, by time): train | valid | test. The two-tower model trains
on train and early-stops on valid; every reported number is on test, with the history
before it (train + valid) as input, exactly as the service would see it.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import hnswlib
import numpy as np
from loguru import logger

from offline.bundle import Bundle, write_bundle
from offline.data import dataset_fingerprint
from offline.dataset import Dataset
from offline.evaluate import baseline_models, report_rows, tune, write_report
from offline.split import TemporalSplit, temporal_split
from offline.train_recall import RecallConfig, TowerTables, TwoTowerRecommender, build_index, train_two_tower
from offline.two_tower import TwoTower


@dataclass
class IndexConfig:
    m: int = field(default=16, metadata={"help": "HNSW graph degree M (memory and recall grow with it)"})
    ef_construction: int = field(default=200, metadata={"help": "HNSW build-time beam width"})
    ef: int = field(default=256, metadata={"help": "HNSW query-time beam width (>= candidates for full recall)"})
    candidates: int = field(default=200, metadata={"help": "recall depth handed to the re-ranker; index recall is reported at it"})


def run_training(ds: Dataset, out: Path, recall_cfg: RecallConfig, index_cfg: IndexConfig,
                 valid_frac: float = 0.1, test_frac: float = 0.1, baselines: bool = True, resume: bool = False) -> Path:
    """Train every stage, evaluate against the peers, write the bundle and its report; returns the bundle path."""
    started = time.perf_counter()
    split = temporal_split(ds.interactions, ds.n_users, ds.n_items, valid_frac, test_frac)
    fingerprint = dataset_fingerprint(ds)
    run_dir = out / "runs" / fingerprint[:12]
    model, tables, history = train_two_tower(ds, split, recall_cfg, run_dir, resume=resume)
    train_seconds = time.perf_counter() - started
    item_vectors = tables.item_vectors(model)
    index = build_index(item_vectors, index_cfg.m, index_cfg.ef_construction, index_cfg.ef)
    index_recall = index_recall_at_depth(index, item_vectors, tables, model, split, index_cfg.candidates)
    logger.info("HNSW recall@{} vs exact: {:.4f}", index_cfg.candidates, index_recall)
    models = (baseline_models(split) + peer_models(split)) if baselines else []
    models += [(TwoTowerRecommender(model, tables), asdict(recall_cfg)), (TwoTowerRecommender(model, tables, index), asdict(index_cfg))]
    rows = report_rows(models, split, "test")
    metrics = {"test": {r["model"]: {k: v for k, v in r.items() if k not in ("model", "params")} for r in rows},
               f"index_recall@{index_cfg.candidates}": index_recall, "train_seconds": train_seconds,
               "recall_history": history}
    bundle = assemble_bundle(ds, split, tables, model, index, item_vectors, recall_cfg, index_cfg, metrics, fingerprint)
    path = write_bundle(out, bundle)
    extra = {"bundle": path.name, f"index_recall@{index_cfg.candidates}": index_recall,
             "two_tower_train_seconds": round(train_seconds, 1)}
    md = write_report(rows, out / "reports" / path.name, f"Evaluation on {ds.name} (test window)", extra)
    logger.info("bundle {} written; report {}", path, md)
    return path


def peer_models(split: TemporalSplit) -> list:
    """implicit's ALS, tuned on valid, when the dev/eval dependency is installed."""
    try:
        from offline.baselines import ALS
    except ImportError:  # pragma: no cover - implicit is a dev dependency
        return []
    grid = [{"factors": f, "regularization": r} for f in (32, 64) for r in (0.05, 0.5)]
    return [tune("als", lambda **p: ALS(split, **p), grid, split)]


def index_recall_at_depth(index: hnswlib.Index, item_vectors: np.ndarray, tables: TowerTables, model: TwoTower,
                          split: TemporalSplit, depth: int) -> float:
    """Share of the exact top-``depth`` items the index returns, over every user's serving vector."""
    users = np.arange(split.n_users)
    user_vecs = tables.user_vectors(model, users, split.history_before("serve"))
    depth = min(depth, len(item_vectors))
    exact = np.argsort(-(user_vecs @ item_vectors.T), axis=1)[:, :depth]
    approx, _ = index.knn_query(user_vecs, k=depth)
    hits = [len(np.intersect1d(a, e)) for a, e in zip(approx, exact)]
    return float(np.sum(hits) / (len(users) * depth))


def assemble_bundle(ds: Dataset, split: TemporalSplit, tables: TowerTables, model: TwoTower, index: hnswlib.Index,
                    item_vectors: np.ndarray, recall_cfg: RecallConfig, index_cfg: IndexConfig, metrics: dict,
                    fingerprint: str) -> Bundle:
    """What the service needs: towers, index, feature tables, serving histories, catalogue."""
    inter = ds.interactions.sorted_by_user_time()
    offsets = np.concatenate([[0], np.cumsum(np.bincount(inter.user, minlength=ds.n_users))])
    arrays = {
        "item_vectors": item_vectors.astype(np.float32),
        "user_cat": tables.user_cat, "user_num": tables.user_num,
        "item_genres": tables.item_genres, "item_dense": tables.item_dense, "item_cat": tables.item_cat,
        "item_year": ds.items.year.astype(np.float32),
        "history_offsets": offsets.astype(np.int64), "history_items": inter.item.astype(np.int64),
        "history_ratings": inter.rating.astype(np.float32), "history_timestamps": inter.timestamp.astype(np.int64),
        "popularity": np.bincount(split.train.item, minlength=ds.n_items).astype(np.float32),
    }
    catalog = {"user_ids": ds.user_ids, "item_ids": ds.item_ids, "titles": ds.items.titles,
               "genre_names": ds.items.genre_names, "user_vocab": ds.users.vocab, "item_vocab": ds.items.extra.vocab}
    manifest = {
        "data_fingerprint": fingerprint, "dataset": ds.name, "implicit": split.implicit,
        "params": {"recall": asdict(recall_cfg), "index": asdict(index_cfg)},
        "metrics": metrics, "model_config": model.config, "feature_spec": tables.spec.to_dict(),
        "index": {"space": "ip", "dim": int(item_vectors.shape[1]), "m": index_cfg.m,
                  "ef_construction": index_cfg.ef_construction, "ef": index_cfg.ef, "max_elements": int(index.get_max_elements())},
    }
    return Bundle(manifest, catalog, arrays, model.user_tower, model.item_tower, index)
