"""What callers hand the engine: plain, already validated values.

The HTTP layer validates bodies strictly (``service/schemas.py``) and converts them to these; the
offline commands build them directly. Ids are the user's raw ids (strings or integers, compared as
strings). ``Item`` is also the form a catalogue change takes in the state store, so it can be read
back from a record written by any version (``Item.from_record``), type-checked, never trusted.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

INT64 = (-(2**63), 2**63 - 1)
MAX_ID_CHARS = 256
MAX_TITLE_CHARS = 1000
MAX_DESCRIPTION_CHARS = 10_000
MAX_FEATURES = 100
YEAR_RANGE = (0, 9999)

RawId = str | int
FeatureValue = str | int | float | None


@dataclass(frozen=True)
class Filters:
    genres_any: list[str] | None = None  # keep items with at least one of these genres
    genres_none: list[str] | None = None  # drop items with any of these genres
    year_min: int | None = None
    year_max: int | None = None

    def __post_init__(self) -> None:
        for name in ("year_min", "year_max"):
            year = getattr(self, name)
            if year is not None and not YEAR_RANGE[0] <= year <= YEAR_RANGE[1]:
                raise ValueError(f"{name} must be in {list(YEAR_RANGE)}")
        if self.year_min is not None and self.year_max is not None and self.year_min > self.year_max:
            raise ValueError("year_min must be <= year_max")


@dataclass(frozen=True)
class RecommendOptions:
    """What a recommendation asks for, for one user or for a batch of users alike."""

    k: int = 10
    candidates: int | None = None  # the two-tower's depth; None: the operator's default, else the bundle's
    exclude_seen: bool = True
    filters: Filters | None = None
    explain: bool = False
    trace: bool = False  # also the user's recent history and every candidate the re-ranker scored


@dataclass(frozen=True)
class RecommendRequest(RecommendOptions):
    """A known user by id, or a user the model never saw by features and recent item ids (oldest first)."""

    user_id: RawId | None = None
    features: dict[str, FeatureValue] | None = None
    recent_items: list[RawId] | None = None


@dataclass(frozen=True)
class Item:
    """A catalogue entry as added or replaced online."""

    item_id: RawId
    title: str = ""
    genres: list[str] = field(default_factory=list)
    year: int | None = None
    features: dict[str, FeatureValue] = field(default_factory=dict)
    description: str = ""  # read by the sentence encoder with the title, when the bundle uses item text

    def to_record(self) -> dict[str, Any]:
        record = asdict(self)
        if not self.description:  # a record without text reads the same in versions before descriptions
            del record["description"]
        return record

    @classmethod
    def from_record(cls, record: Any) -> "Item":
        """An item from a stored record, every field type-checked (a log edited by hand or written by another
        version may hold anything); raises ``ValueError`` naming the first bad field."""
        if not isinstance(record, dict):
            raise ValueError("an item must be an object")
        unknown = sorted(set(record) - {"item_id", "title", "genres", "year", "features", "description"})
        if unknown:
            raise ValueError(f"unknown fields {unknown}")
        item_id = record.get("item_id")
        if not (_is_int64(item_id) or (isinstance(item_id, str) and item_id.strip() and len(item_id) <= MAX_ID_CHARS)):
            raise ValueError("item_id must be a non-empty string or a 64-bit integer")
        title, genres, year = record.get("title", ""), record.get("genres", []), record.get("year")
        if not isinstance(title, str) or len(title) > MAX_TITLE_CHARS:
            raise ValueError(f"title must be a string of at most {MAX_TITLE_CHARS} characters")
        if not isinstance(genres, list) or not all(isinstance(g, str) and len(g) <= MAX_ID_CHARS for g in genres):
            raise ValueError("genres must be a list of strings")
        if year is not None and not (_is_int64(year) and YEAR_RANGE[0] <= year <= YEAR_RANGE[1]):
            raise ValueError(f"year must be an integer in {list(YEAR_RANGE)}")
        description = record.get("description", "")
        if not isinstance(description, str) or len(description) > MAX_DESCRIPTION_CHARS:
            raise ValueError(f"description must be a string of at most {MAX_DESCRIPTION_CHARS} characters")
        features = record.get("features", {})
        if not isinstance(features, dict) or len(features) > MAX_FEATURES or not all(
                isinstance(name, str) and _is_feature_value(value) for name, value in features.items()):
            raise ValueError(f"features must map at most {MAX_FEATURES} names to strings, finite numbers or null")
        return cls(item_id, title, list(genres), year, dict(features), description)


def _is_int64(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and INT64[0] <= value <= INT64[1]


def _is_feature_value(value: Any) -> bool:
    if value is None or _is_int64(value):
        return True
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, str) and len(value) <= MAX_ID_CHARS
