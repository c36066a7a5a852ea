"""The rating scale is read from the training data once and stored in the bundle manifest, where
the service finds the range ``/events`` ratings must fall in."""
from __future__ import annotations

import json

import numpy as np

from offline.pipeline import rating_scale
from recsys.bundle import resolve
from recsys.dataset import Interactions


def interactions(*ratings: float) -> Interactions:
    n = len(ratings)
    return Interactions(np.zeros(n, np.int64), np.arange(n), np.array(ratings, np.float32), np.arange(n))


def test_the_bundle_manifest_carries_the_min_and_max_rating_of_the_training_data(bundle_root, tiny_dataset):
    manifest = json.loads((resolve(bundle_root) / "manifest.json").read_text())
    ratings = tiny_dataset.interactions.rating
    assert manifest["rating_scale"] == {"min": float(ratings.min()), "max": float(ratings.max())}
    assert manifest["rating_scale"] == {"min": 1.0, "max": 5.0}  # the synthetic data rates 1..5


def test_a_one_to_five_scale_is_read_without_a_warning(warnings):
    assert rating_scale(interactions(3, 1, 4.5, 5)) == {"min": 1.0, "max": 5.0}
    assert warnings == []


def test_implicit_feedback_has_the_one_point_scale_of_its_ratings(warnings):
    assert rating_scale(interactions(1, 1, 1)) == {"min": 1.0, "max": 1.0}
    assert warnings == []


def test_a_scale_beyond_one_to_five_is_stored_as_read_and_warned_about(warnings):
    assert rating_scale(interactions(0.5, 10, 7)) == {"min": 0.5, "max": 10.0}
    assert warnings == ["ratings span 0.5..10; the tower's rating codes clip to 0..5 and rating >= 4 counts as "
                        "positive: rescale the ratings to 1..5 for full use of them"]
