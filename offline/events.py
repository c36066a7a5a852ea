"""Events the service recorded, merged into the training data: the loop from serving back to training.

``python -m offline train --events SOURCE`` reads a state source (a file-backend state directory or a
Redis URL) through the core's state-store code (``recsys.state.open.read_source``: one contract for the
logs, written and read in one place) and merges it into the loaded dataset:

- catalogue changes: items added online join the catalogue with their title, genres, year and
  features (so they get an id embedding); replaced items take their new metadata; removed items stay
  (their past interactions happened; the service's catalogue fold removes them again when it loads
  the bundle);
- events: new users get rows (features unknown), events on items unknown even after the catalogue
  changes are skipped and counted, an event without a rating takes the data's median rating (an
  interaction without a verdict: neither a strong positive nor a negative), and an event identical to
  one already in the data (same user, item, timestamp and rating) is dropped, so a replayed log adds
  nothing twice. Order is by timestamp, ties by log position: deterministic.

The last event position read is the bundle's watermark (``manifest["events_watermark"]``): a service
on the same store serves only the events after it on top of the bundle's history.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np
from loguru import logger

from recsys.dataset import Dataset, FeatureTable, Interactions, ItemTable
from recsys.text import record_text
from recsys.state.open import LoggedState


@dataclass
class MergeReport:
    new_users: int = 0
    new_items: int = 0
    replaced_items: int = 0
    events: int = 0
    skipped: dict[str, int] = field(default_factory=dict)


def merge_events(ds: Dataset, logged: LoggedState) -> tuple[Dataset, MergeReport]:
    """``ds`` with the logged catalogue changes and events merged in (see the module docstring)."""
    report = MergeReport()
    items, item_ids = _merge_items(ds, logged.items, report)
    user_ids = list(ds.user_ids)
    user_row = {u: r for r, u in enumerate(user_ids)}
    item_row = {i: r for r, i in enumerate(item_ids)}
    no_rating = float(np.median(ds.interactions.rating)) if len(ds.interactions) else 1.0
    seen = set(zip(ds.interactions.user.tolist(), ds.interactions.item.tolist(), ds.interactions.timestamp.tolist(),
                   ds.interactions.rating.tolist()))
    rows: list[tuple[int, int, int, float]] = []
    for _, user, event in sorted(logged.events, key=lambda e: (e[2].timestamp, e[0])):
        item = item_row.get(event.item_id)
        if item is None:
            report.skipped["event on an unknown item"] = report.skipped.get("event on an unknown item", 0) + 1
            continue
        if user not in user_row:
            user_row[user] = len(user_ids)
            user_ids.append(user)
        rating = float(np.float32(event.rating if event.rating is not None else no_rating))
        row = (user_row[user], item, event.timestamp, rating)  # the order of ``seen``
        if row in seen:
            report.skipped["duplicate event"] = report.skipped.get("duplicate event", 0) + 1
            continue
        seen.add(row)
        rows.append(row)
    report.new_users, report.events = len(user_ids) - ds.n_users, len(rows)
    merged = replace(ds, interactions=_append(ds.interactions, rows), user_ids=user_ids, item_ids=item_ids,
                     users=_grow(ds.users, len(user_ids)), items=items,
                     events_watermark={"source": logged.source, "position": list(logged.watermark)} if logged.watermark else None)
    logger.info("events merged from {}: {} events, {} new users, {} new items, {} replaced items, skipped {}",
                logged.source, report.events, report.new_users, report.new_items, report.replaced_items, report.skipped)
    return merged, report


def _merge_items(ds: Dataset, fold: dict[str, dict | None], report: MergeReport) -> tuple[ItemTable, list[str]]:
    """The catalogue with added and replaced items (upserts in the fold); removals change nothing here."""
    items, item_ids = ds.items, list(ds.item_ids)
    row_of = {i: r for r, i in enumerate(item_ids)}
    titles, years = list(items.titles), items.year.astype(np.float32).copy()
    text = {c: list(v) for c, v in items.text.items()}
    genres = items.genres.copy()
    extra = _grow(items.extra, items.n_items)
    genre_col = {g: j for j, g in enumerate(items.genre_names)}
    for item_id, item in fold.items():
        if item is None:
            continue
        row = row_of.get(item_id)
        if row is None:
            row = row_of[item_id] = len(item_ids)
            item_ids.append(item_id)
            titles.append(item.get("title") or item_id)
            for c, values in text.items():
                values.append("")
            years, genres, extra = np.append(years, np.nan), np.vstack([genres, np.zeros((1, genres.shape[1]), bool)]), _grow(extra, row + 1)
            report.new_items += 1
        else:
            titles[row] = item.get("title") or titles[row]
            report.replaced_items += 1
        years[row] = np.nan if item.get("year") is None else item["year"]
        genres[row] = False
        genres[row, [genre_col[g] for g in item.get("genres", []) if g in genre_col]] = True
        _set_features(extra, row, item.get("features", {}))
        for c, value in record_text(item, list(text)).items():
            text[c][row] = value
    return ItemTable(titles, years, genres, items.genre_names, extra, text), item_ids


def _grow(table: FeatureTable, n_rows: int) -> FeatureTable:
    """``table`` with rows appended up to ``n_rows``: unknown categoricals (code 0), missing numerics (NaN)."""
    extra = n_rows - table.n_rows
    return FeatureTable(n_rows, {k: np.concatenate([v, np.zeros(extra, v.dtype)]) for k, v in table.categorical.items()},
                        table.vocab, {k: np.concatenate([v, np.full(extra, np.nan, v.dtype)]) for k, v in table.numeric.items()})


def _set_features(table: FeatureTable, row: int, raw: dict) -> None:
    """An item's raw features into its row, through the table's own vocabularies (unseen values -> 0)."""
    for name, codes in table.categorical.items():
        codes[row] = table.encode(name, raw.get(name))
    for name, values in table.numeric.items():
        value = raw.get(name)
        values[row] = float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else np.nan


def _append(inter: Interactions, rows: list[tuple[int, int, int, float]]) -> Interactions:
    """``inter`` with ``(user, item, timestamp, rating)`` rows appended."""
    if not rows:
        return inter
    user, item, ts, rating = (np.array(col) for col in zip(*rows))
    return Interactions(np.concatenate([inter.user, user.astype(np.int64)]), np.concatenate([inter.item, item.astype(np.int64)]),
                        np.concatenate([inter.rating, rating.astype(np.float32)]),
                        np.concatenate([inter.timestamp, ts.astype(np.int64)]))
