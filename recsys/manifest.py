"""The bundle's manifest, typed: what readers need of ``manifest.json``, parsed once when the bundle is read.

``Bundle.manifest`` keeps the JSON object as written (reports and tests read it whole); every reader of
a field goes through ``Manifest`` instead of a string path, so a field's name, type and default live here.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from recsys.features import FeatureSpec
from recsys.state.protocol import Position

DEFAULT_RATING_SCALE = (0.0, 5.0)  # bundles written before the scale was recorded accepted 0..5


class ManifestError(ValueError):
    """A manifest field with the wrong shape; the message names the field."""


@dataclass(frozen=True)
class Watermark:
    """The last event a bundle was trained on, and the state source it was read from."""

    source: str
    position: Position


@dataclass(frozen=True)
class Manifest:
    version: str
    feature_spec: FeatureSpec
    n_items: int  # items the towers were trained on: rows below this have an id embedding
    candidates: int  # the two-tower depth the ranker was trained and evaluated on
    item_item_candidates: int  # the item-item channel's share of the ranker's candidates
    rating_scale: tuple[float, float]
    watermark: Watermark | None

    @classmethod
    def parse(cls, raw: dict[str, Any]) -> "Manifest":
        try:
            index = raw["params"]["index"]
            scale = raw.get("rating_scale") or dict(zip(("min", "max"), DEFAULT_RATING_SCALE))
            mark = raw.get("events_watermark")
            return cls(str(raw["version"]), FeatureSpec(**raw["feature_spec"]), int(raw["model_config"]["n_items"]),
                       int(index["candidates"]), int(index.get("item_item_candidates", 0)),
                       (float(scale["min"]), float(scale["max"])),
                       Watermark(str(mark["source"]), tuple(mark["position"])) if mark else None)
        except (KeyError, TypeError, ValueError) as err:
            raise ManifestError(f"manifest.json: a field is missing or malformed ({type(err).__name__}: {err})") from err

    def events_after(self, source: str) -> Position | None:
        """Where the online history starts for a store at ``source``: after the watermark when the bundle was
        trained on this very store (its history already holds the earlier events), else from the start."""
        if self.watermark is None or self.watermark.source != source:
            return None
        return self.watermark.position
