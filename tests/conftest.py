"""Shared fixtures: a small synthetic bundle trained once per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from loguru import logger

from offline.pipeline import IndexConfig, run_training
from offline.ranker import RankerConfig
from offline.synthetic import generate
from offline.train_recall import RecallConfig
from tests.servicekit import (  # noqa: F401  (service fixtures)
    _backend_service, _restore_torch_threads, backend_client, backend_start, bundle, client, own_root, redis_cluster_url,
    redis_url, start)

logger.remove()
logger.add(sys.stderr, level="WARNING")

@pytest.fixture
def warnings() -> list[str]:
    """Loguru warnings emitted during the test (their messages)."""
    messages: list[str] = []
    handler = logger.add(lambda m: messages.append(m.record["message"]), level="WARNING")
    yield messages
    logger.remove(handler)


TINY_RECALL = dict(epochs=2, batch_size=256, dim=16, emb_dim=16, hidden=32, history_len=10, device="cpu")
TINY_RANKER = dict(epochs=2, hidden=16, gbm_trees=10, gbm_min_leaf=5)


@pytest.fixture(scope="session")
def tiny_dataset():
    return generate(n_users=120, n_items=150, n_genres=5, interactions_per_user=20, seed=3)


@pytest.fixture(scope="session")
def bundle_root(tmp_path_factory, tiny_dataset) -> Path:
    """A real bundle written by the offline pipeline (two short epochs: fast, not good)."""
    root = tmp_path_factory.mktemp("artifacts")
    run_training(tiny_dataset, root, RecallConfig(**TINY_RECALL), IndexConfig(m=8, ef_construction=50, ef=64, candidates=50, item_item_candidates=100),
                 baselines=False, ranker_cfg=RankerConfig(**TINY_RANKER))
    return root


@pytest.fixture(scope="module")
def one_torch_thread():
    """Torch on one thread for a module: training is then deterministic, and much faster on two cores shared
    with other work."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
