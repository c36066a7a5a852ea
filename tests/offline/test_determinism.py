"""Same seed, same machine, same data -> the same bundle: the whole pipeline twice, and its parts.

Before the fix two default MovieLens runs gave two-tower Recall@20 0.257 and 0.285: the HNSW
indexes were built by several threads at once, so their graphs (and the hard negatives mined
from them, and the candidates the re-ranker saw) depended on thread scheduling. Hard negatives
are now mined by exact search over a pool of item vectors (offline/train_recall.py), no index.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from offline.pipeline import IndexConfig, run_training
from offline.ranker import RankerConfig
from offline.recall_eval import build_index
from offline.train_recall import RecallConfig, deterministic_torch
from tests.conftest import TINY_RANKER, TINY_RECALL

pytestmark = pytest.mark.slow


def without_timings(value: Any) -> Any:
    """The manifest's metrics minus wall-clock seconds, the one part that may differ between runs."""
    if isinstance(value, dict):
        return {k: without_timings(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [without_timings(v) for v in value]
    return value


def train_once(ds, root: Path) -> tuple[dict, np.ndarray, bytes]:
    """Train the tiny pipeline (hard negatives on, as by default) into ``root``; metrics, vectors, index."""
    path = run_training(ds, root, RecallConfig(**TINY_RECALL), IndexConfig(m=8, ef_construction=50, ef=64, candidates=50),
                        baselines=False, ranker_cfg=RankerConfig(**TINY_RANKER))
    manifest = json.loads((path / "manifest.json").read_text())
    with np.load(path / "arrays.npz") as arrays:
        vectors = arrays["item_vectors"]
    return manifest["metrics"], vectors, (path / "item_index.bin").read_bytes()


def test_two_runs_with_the_same_seed_write_identical_metrics_vectors_and_index(tiny_dataset, tmp_path):
    first, second = train_once(tiny_dataset, tmp_path / "a"), train_once(tiny_dataset, tmp_path / "b")
    assert without_timings(first[0]) == without_timings(second[0])
    assert first[0]["test"]["two-tower (hnsw)"]["recall@20"] > 0  # a real run, not two empty ones
    np.testing.assert_array_equal(first[1], second[1])
    assert first[2] == second[2]


def test_single_threaded_index_builds_are_byte_identical_and_the_default(tmp_path):
    vectors = np.random.default_rng(0).normal(size=(3000, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    for name in ("a", "b"):
        build_index(vectors, m=16, ef_construction=100, ef=50, seed=7).save_index(str(tmp_path / name))
    assert (tmp_path / "a").read_bytes() == (tmp_path / "b").read_bytes()
    assert IndexConfig().build_threads == 1


def test_deterministic_torch_sets_then_restores_the_global_torch_state():
    threads = torch.get_num_threads()
    assert not torch.are_deterministic_algorithms_enabled()
    with deterministic_torch(threads=1):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.get_num_threads() == 1
    assert not torch.are_deterministic_algorithms_enabled()
    assert torch.get_num_threads() == threads
