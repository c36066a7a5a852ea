"""Ranker inference: a stored ranker state (``bundle.ranker``) as a scorer, ``score(features [n, F]) -> [n]``.

Training (losses, fitting, LambdaMART) lives in ``offline/ranker.py``; the service and batch
recommendations only score, so only this module is on the request path.
"""
from __future__ import annotations

import numpy as np
import torch

from recsys.rank_features import FEATURE_NAMES, assemble, layout

BLOCK = 2048  # rows per matmul block when scoring


class Ranker:
    """A loaded re-ranker: ``score(features [n, F]) -> [n]``, higher is better."""

    kind = "ranker"

    def __init__(self, state: dict):
        self.feature_names: list[str] = list(state["feature_names"])
        self.loss: str = state["loss"]
        self.metrics: dict = dict(state.get("metrics", {}))

    def score(self, features: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def score_parts(self, blocks: list[np.ndarray], constants: list[np.ndarray]) -> np.ndarray:
        """The scores of several users' candidates, given as each user's candidate block and constant columns
        (``recsys.rank_features.candidate_block`` / ``UserFeatures.constant``): assembled, then ``score``."""
        return self.score(np.concatenate([assemble(b, k) for b, k in zip(blocks, constants)]))


class MLPRanker(Ranker):
    """The MLP replayed with numpy matmuls: no torch on the request path.

    The stored scale is folded into the first layer (``(x - mean) / std @ W`` is ``(x - mean) @ W'``; the mean
    stays a subtraction, so that a feature far from zero loses no precision), and that layer is split by column:
    the user's constant columns contribute one bias per user, so a request's first layer multiplies only the
    columns that vary by candidate (``score_parts``)."""

    kind = "mlp"

    def __init__(self, state: dict):
        super().__init__(state)
        mean, inv_std = _np(state["mean"]), 1.0 / _np(state["std"])
        sd = state["state_dict"]
        linear = sorted({k.rsplit(".", 1)[0] for k in sd}, key=lambda k: int(k.split(".")[1]))
        weights = [np.ascontiguousarray(_np(sd[f"{name}.weight"]).T) for name in linear]
        biases = [_np(sd[f"{name}.bias"]) for name in linear]
        self.mean, self.first, self.first_bias = mean, np.ascontiguousarray(weights[0] * inv_std[:, None]), biases[0]
        self.split = None  # a model of other inputs (tests, experiments) has no split
        if self.feature_names[: len(FEATURE_NAMES)] == FEATURE_NAMES:
            n_genres = sum(name.startswith("genre_") for name in self.feature_names[len(FEATURE_NAMES):])
            block, constant = layout(n_genres, len(self.feature_names))
            self.split = (mean[block], np.ascontiguousarray(self.first[block]), mean[constant], self.first[constant])
        self.weights, self.biases = weights[1:], biases[1:]

    def score(self, features: np.ndarray) -> np.ndarray:
        """Scored in blocks of ``BLOCK`` rows, so that a batch's intermediates stay in cache (one pass over the
        250k candidates of a 943-user batch took twice as long as blocks of 2048)."""
        features = np.asarray(features, np.float32)
        return self._chunks(len(features), lambda rows: (features[rows] - self.mean) @ self.first + self.first_bias)

    def score_parts(self, blocks: list[np.ndarray], constants: list[np.ndarray]) -> np.ndarray:
        if self.split is None:
            return super().score_parts(blocks, constants)
        block_mean, block_weights, constant_mean, constant_weights = self.split
        x = np.concatenate(blocks) if len(blocks) != 1 else blocks[0]
        bias = np.stack([self.first_bias + (k - constant_mean) @ constant_weights for k in constants])
        owner = np.repeat(np.arange(len(blocks)), [len(b) for b in blocks])
        return self._chunks(len(x), lambda rows: (x[rows] - block_mean) @ block_weights + bias[owner[rows]])

    def _chunks(self, n: int, first_layer) -> np.ndarray:
        return np.concatenate([self._rest(first_layer(slice(i, i + BLOCK))) for i in range(0, n, BLOCK)] or
                              [np.zeros(0, np.float32)])

    def _rest(self, x: np.ndarray) -> np.ndarray:
        """The layers after the first (whose output ``x`` is; a linear model has none)."""
        for w, b in zip(self.weights, self.biases):
            x = np.maximum(x, 0.0) @ w + b
        return x.ravel()


class LambdaMARTRanker(Ranker):
    """A LightGBM booster (lightgbm is then a runtime dependency)."""

    kind = "lambdamart"

    def __init__(self, state: dict):
        super().__init__(state)
        import lightgbm as lgb

        self.booster = lgb.Booster(model_str=state["model"])

    def score(self, features: np.ndarray) -> np.ndarray:
        return self.booster.predict(np.asarray(features, np.float32), num_threads=1)


def load_ranker(state: dict) -> Ranker:
    """The serving scorer for a stored ranker state (``bundle.ranker``)."""
    kinds = {"mlp": MLPRanker, "lambdamart": LambdaMARTRanker}
    if state.get("kind") not in kinds:
        raise ValueError(f"ranker state: unknown kind {state.get('kind')!r}; expected one of {sorted(kinds)}")
    return kinds[state["kind"]](state)


def _np(t) -> np.ndarray:
    return (t.detach().cpu().numpy() if isinstance(t, torch.Tensor) else np.asarray(t)).astype(np.float32)
