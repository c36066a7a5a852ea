"""What refitting on more data would buy, measured the only honest way: refit on train + valid, score on test.

The pipeline's two-tower trains on the train window (early-stopping on valid) and its item statistics
(popularity, ratings, EASE and sequence neighbours) come from train. A served bundle could learn from
every interaction instead; that cannot be scored, but its one-window-earlier twin can:

1. read a bundle trained by ``python -m offline train --seed S`` (its ranker and the epoch the
   two-tower's early stopping chose);
2. retrain the two-tower with the same configuration and seed on train + valid for exactly that many
   epochs (same learning-rate schedule, no selection: the last epoch's weights);
3. rebuild the index and the item statistics on train + valid (and, for comparison, keep train's);
4. score on test, through the bundle's own ranker, the two-tower alone and both re-ranked variants.

The ranker is not retrained: its queries need labels the tower never saw (the valid window), so it stays
the one trained beside the train-window tower. The output is a JSON line per run, for docs/evaluation.md
("Refit on more data").

    python -m bench.refit_eval --bundle /tmp/seeds/seq0 --out refit0.json
"""
from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch

from offline import data
from offline.bundle import read_bundle, resolve
from offline.evaluate import report_rows
from offline.pipeline import EVAL_USERS, bundle_arrays
from offline.rank_features import RankerTables
from offline.ranker import load_ranker
from offline.split import TemporalSplit, concat_windows, temporal_split
from offline.train_ranker import RankContext, RerankRecommender
from offline.train_recall import (RecallConfig, TowerTables, TwoTowerRecommender, _Trainer, build_index,
                                  deterministic_torch, rank_device, resolve_device, seed_everything)
from offline.two_tower import TwoTower


def refit_tower(ds, split: TemporalSplit, cfg: RecallConfig, epochs: int) -> tuple[TwoTower, TowerTables]:
    """The two-tower trained on ``split.train`` for ``epochs`` epochs of the original schedule, last weights."""
    with deterministic_torch(cfg.threads):
        seed_everything(cfg.seed)
        tables = TowerTables.build(ds, cfg.history_len, rank_device(resolve_device(cfg.device)))
        spec = tables.spec
        model = TwoTower(ds.n_users, ds.n_items, spec.n_genres, spec.n_item_dense, spec.item_cat_sizes,
                         spec.user_cat_sizes, len(spec.user_numeric), cfg.history_len, cfg.emb_dim, cfg.dim, cfg.hidden)
        run = _Trainer(cfg, model, tables, split, Path(tempfile.mkdtemp()))
        for epoch in range(epochs):
            run.train_epoch(epoch)
        return model.eval(), tables


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bundle", type=Path, required=True, help="bundle root (or version dir) trained on MovieLens-100K")
    p.add_argument("--out", type=Path, required=True, help="JSON file for the test metrics")
    args = p.parse_args()
    bundle = read_bundle(resolve(args.bundle))
    params, metrics = bundle.manifest["params"], bundle.manifest["metrics"]
    cfg = RecallConfig(**params["recall"])
    epochs = 1 + max(metrics["recall_history"], key=lambda h: h[f"recall@{cfg.eval_k}"])["epoch"]
    ranker = load_ranker(bundle.ranker)
    index_cfg = params["index"]

    ds = data.load_movielens(None)
    split = temporal_split(ds.interactions, ds.n_users, ds.n_items, 0.1, 0.1, EVAL_USERS)
    wider = TemporalSplit(split.n_users, split.n_items, concat_windows([split.train, split.valid]).sorted_by_user_time(),
                          split.test, split.test, split.implicit, split.max_eval_users)  # only .train is read below
    model, tables = refit_tower(ds, wider, cfg, epochs)
    vectors = tables.item_vectors(model)
    index = build_index(vectors, index_cfg["m"], index_cfg["ef_construction"], index_cfg["ef"], threads=1, seed=cfg.seed)
    models = [(TwoTowerRecommender(model, tables, index), {})]
    for name, stats in (("refit tower + train+valid statistics", wider), ("refit tower + train statistics", split)):
        arrays = bundle_arrays(ds, stats, tables, vectors)
        ctx = RankContext(TwoTowerRecommender(model, tables, index), RankerTables.from_arrays(arrays), arrays,
                          index_cfg["candidates"], index_cfg["item_item_candidates"])
        models.append((RerankRecommender(ctx, ranker, f"{name}, bundle's ranker"), {}))
    rows, _ = report_rows(models, split, "test")
    result = {"seed": cfg.seed, "epochs": epochs, "torch": torch.__version__,
              **{r["model"]: {m: r[m] for m in ("recall@20", "ndcg@10")} for r in rows}}
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
