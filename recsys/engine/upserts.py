"""Catalogue changes: items added, replaced or removed online, encoded by the bundle's item tower.

A change is validated and encoded beside the live catalogue (``prepare``), then written into its rows and the
index at once (``LiveCatalog.commit``). A batch costs one tower call and one write of the rows it changes, so
applying a store's whole catalogue fold costs what it holds, not a copy of the catalogue per item.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from loguru import logger

from recsys.bundle import Bundle
from recsys.engine.catalog import Catalog, LiveCatalog, Upsert
from recsys.engine.users import check_features
from recsys.errors import RecsysError, UnknownId
from recsys.features import FeatureSpec, codes_of, encode_item_features
from recsys.query import Item
from recsys.text import TextEncoder, item_text, record_text


class CatalogChanges:
    def __init__(self, bundle: Bundle, spec: FeatureSpec, live: LiveCatalog, genre_cols: Callable[[list[str]], list[int]],
                 model_items: int, ranked: bool, encoder: TextEncoder | None = None):
        """``encoder``: the sentence encoder of a bundle whose item tower reads text (``spec.text_dim``)."""
        self.bundle, self.spec, self.live, self.genre_cols = bundle, spec, live, genre_cols
        self.model_items, self.ranked, self.encoder = model_items, ranked, encoder
        self.text_fields = [c for c in spec.text_columns or () if c not in ("title", "description")]
        self.codes = codes_of(bundle.catalog.get("item_vocab", {}))

    def require_item(self, raw_item: str, catalog: Catalog | None = None) -> int:
        """The row of a live (not removed) item, else ``UnknownId``."""
        catalog = catalog or self.live.catalog
        row = catalog.row_of.get(raw_item)
        if row is None or row >= len(catalog.active) or not catalog.active[row]:  # (an id added since ``catalog``)
            raise UnknownId(f"unknown item_id '{raw_item}'")
        return row

    def load(self, items: dict[str, dict | None]) -> None:
        """Apply a store's catalogue fold (every upsert in one batch). Changes that no longer apply to this bundle
        (a genre it lacks...) are counted and logged, not fatal."""
        skipped = self.apply_all(list(items.items()), index_now=True)
        if skipped:
            logger.warning("catalogue on bundle {}: {} changes skipped (first: {})", self.bundle.version, len(skipped), skipped[:3])

    def apply_all(self, changes: list[tuple[str, dict | None]], index_now: bool = False) -> list[str]:
        """Changes from the store, in their order: each run of upserts in one batch (one tower call, one text
        encoder call, one write), a removal between them in its place. A batch that fails is applied item by
        item, so one bad item cannot lose the others; returns what was skipped and why. ``index_now``: into the
        HNSW graph before returning (the fold at start), not by the merge thread (``LiveCatalog.commit``)."""
        skipped: list[str] = []
        run: list[Item] = []
        for item_id, record in [*changes, ("", None)]:  # the sentinel flushes the last run
            if record is not None:
                try:
                    run.append(Item.from_record(record))
                except ValueError as err:  # an entry this version cannot read: skipped, not fatal
                    skipped.append(f"{item_id}: {err}")
                continue
            if run:
                try:
                    self.live.commit(self.prepare(run), index_now)
                except RecsysError as err:
                    skipped += self._upsert_each(run, err, index_now)
                run = []
            if item_id and (row := self.live.catalog.row_of.get(item_id)) is not None and self.live.catalog.active[row]:
                self.remove(item_id)
        return skipped

    def _upsert_each(self, items: list[Item], first_error: RecsysError, index_now: bool) -> list[str]:
        skipped = []
        for item in items:
            try:
                self.live.commit(self.prepare([item]), index_now)
            except RecsysError as err:
                skipped.append(f"{item.item_id}: {err.message}")
        return skipped or [first_error.message]

    def check(self, items: list[Item]) -> list[str]:
        """Refuse items this bundle cannot encode (an unknown genre or feature) before anything is recorded;
        returns what each change will be, "added" or "replaced"."""
        for item in items:
            self._genre_row(item)
        return ["replaced" if str(item.item_id) in self.live.catalog.row_of else "added" for item in items]

    def prepare(self, items: list[Item]) -> Upsert:
        """Validate and encode items, touching nothing live: O(len(items)); ``LiveCatalog.commit`` writes them."""
        raws = [str(it.item_id) for it in items]
        row_of = self.live.row_of  # an id keeps its row for good: read here, it is still right at the commit
        rows = np.stack([self._genre_row(it) for it in items])
        genres, dense, cat = encode_item_features(self.spec, self.codes, rows, [it.year for it in items],
                                                  [it.features for it in items])
        ids = np.array([row + 1 if (row := row_of.get(raw, self.model_items)) < self.model_items else 0 for raw in raws])
        text = self.text_vectors(items)  # (only trained items have an id embedding)
        vecs, content = self._tower(ids, genres, dense, cat, text)
        years = np.array([np.nan if it.year is None else it.year for it in items], np.float32)
        values = {"item_vectors": vecs, "item_genres": genres, "item_dense": dense, "item_cat": cat, "item_year": years,
                  "item_content_vectors": content, "item_text": text}
        return Upsert(raws, [it.title for it in items], {k: v for k, v in values.items() if v is not None})

    def text_vectors(self, items: list[Item]) -> np.ndarray | None:
        """The items' sentence vectors as the bundle stores them (float16), one encoder call for the batch;
        None when the bundle's tower reads no text."""
        if self.encoder is None:
            return None
        columns = self.spec.text_columns or []
        texts = [item_text(record_text(it.to_record(), columns), columns) for it in items]
        return self.encoder.encode(texts).astype(np.float16)

    def _tower(self, ids: np.ndarray, genres: np.ndarray, dense: np.ndarray, cat: np.ndarray,
               text: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        """One item tower call for the served vectors (``ids``) and the content-only ones (id 0), which
        content-based similar items compare; for a new item the two are the same."""
        n = len(ids)
        inputs = [np.concatenate([ids, np.zeros(n, ids.dtype)]), *(np.concatenate([x, x]) for x in (genres, dense, cat))]
        if text is not None:
            inputs.append(np.concatenate([text, text]).astype(np.float32))
        with torch.inference_mode():
            out = self.bundle.item_tower(*(torch.from_numpy(x) for x in inputs)).numpy()
        return out[:n], out[n:]

    def remove(self, raw: str) -> dict:
        self.live.remove(self.require_item(raw))
        return {"item_id": raw, "status": "removed"}

    def _genre_row(self, item: Item) -> np.ndarray:
        """The item's multi-hot genres, once its genres and features are known to this bundle (else ``InvalidInput``)."""
        genre_row = np.zeros(self.spec.n_genres, bool)
        genre_row[self.genre_cols(item.genres)] = True
        check_features({k: v for k, v in item.features.items() if k not in self.text_fields}, self.spec.item_categorical,
                       self.spec.item_numeric, "item", self.text_fields)
        return genre_row
