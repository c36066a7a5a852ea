"""Typed, dense-indexed tables that every offline stage and the service share.

Raw ids (strings, exactly as the user's files spell them) exist only at the edges;
everything inside works on dense rows: ``user_row`` in ``[0, n_users)`` and
``item_row`` in ``[0, n_items)``. Categorical feature codes reserve 0 for
"unknown / missing" so that an unseen value at serving time has a defined meaning.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from recsys.text import item_text

UNKNOWN = "<unk>"


@dataclass
class FeatureTable:
    """Per-row features: categorical columns as int codes (0 = unknown), numeric as float32.

    ``vocab[name][code]`` is the raw value of a code; ``vocab[name][0]`` is always ``UNKNOWN``.
    Missing numeric values are NaN.
    """

    n_rows: int
    categorical: dict[str, np.ndarray] = field(default_factory=dict)
    vocab: dict[str, list[str]] = field(default_factory=dict)
    numeric: dict[str, np.ndarray] = field(default_factory=dict)

    def encode(self, name: str, value: str | None) -> int:
        """Code of a raw categorical value; 0 when unseen (the serving path for new users)."""
        if value is None:
            return 0
        lookup = self._lookups().get(name)
        return 0 if lookup is None else lookup.get(str(value), 0)

    def _lookups(self) -> dict[str, dict[str, int]]:
        if not hasattr(self, "_lookup_cache"):
            self._lookup_cache = {k: {v: i for i, v in enumerate(vs)} for k, vs in self.vocab.items()}
        return self._lookup_cache


@dataclass
class ItemTable:
    """Item metadata: title, release year (NaN if unknown), multi-hot genres, extra features."""

    titles: list[str]
    year: np.ndarray  # float32 [n_items], NaN when unknown
    genres: np.ndarray  # bool [n_items, n_genres]
    genre_names: list[str]
    extra: FeatureTable
    # the columns the sentence encoder reads, by name, in the order they are joined (title first); empty: the
    # catalogue has no text (titles that are only raw ids are not text)
    text: dict[str, list[str]] = field(default_factory=dict)

    @property
    def n_items(self) -> int:
        return len(self.titles)

    def item_texts(self) -> list[str]:
        """Each item's text as the encoder reads it (``recsys.text.item_text``: the same at upsert time)."""
        columns = list(self.text)
        return [item_text({c: self.text[c][row] for c in columns}, columns) for row in range(self.n_items)]


@dataclass
class Interactions:
    """Parallel arrays, one entry per (user, item, rating, timestamp) event."""

    user: np.ndarray  # int64 user rows
    item: np.ndarray  # int64 item rows
    rating: np.ndarray  # float32
    timestamp: np.ndarray  # int64 seconds (or any monotone clock)

    def __len__(self) -> int:
        return len(self.user)

    def subset(self, mask_or_index: np.ndarray) -> "Interactions":
        return Interactions(
            self.user[mask_or_index],
            self.item[mask_or_index],
            self.rating[mask_or_index],
            self.timestamp[mask_or_index],
        )

    def sorted_by_user_time(self) -> "Interactions":
        """Stable order (user, timestamp, original position): what the temporal split relies on."""
        order = np.lexsort((np.arange(len(self)), self.timestamp, self.user))
        return self.subset(order)


@dataclass
class Dataset:
    """Everything loaded from one source, with the raw<->dense id maps."""

    name: str
    interactions: Interactions
    user_ids: list[str]  # user_row -> raw id
    item_ids: list[str]  # item_row -> raw id
    users: FeatureTable
    items: ItemTable
    skipped: dict[str, int] = field(default_factory=dict)  # reason -> rows skipped (reported, never silent)
    events_watermark: dict | None = None  # {"source", "position"} of the last logged event merged in (offline/events.py)

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def user_row(self, raw_id: str) -> int | None:
        return self._index("_user_index", self.user_ids).get(str(raw_id))

    def item_row(self, raw_id: str) -> int | None:
        return self._index("_item_index", self.item_ids).get(str(raw_id))

    def _index(self, attr: str, ids: list[str]) -> dict[str, int]:
        if not hasattr(self, attr):
            setattr(self, attr, {raw: row for row, raw in enumerate(ids)})
        return getattr(self, attr)
