"""Answers: the returned items as the API shows them, with their explanations and the optional trace.

An entry is ``(row, recall score, ranking score, recall rank, popularity, reasons, source)``; a fallback's
entries have only the row and its popularity.
"""
from __future__ import annotations

import numpy as np

from recsys.engine.catalog import Catalog
from recsys.engine.rerank import Candidates
from recsys.engine.users import UserContext
from recsys.query import RecommendOptions

TRACE_HISTORY = 50  # history items a traced response shows
Entry = tuple


class Answers:
    """Renders entries for one bundle: its genre names, the ranker's feature names for people, and the tower's
    history window (the recall reasons look at it)."""

    def __init__(self, genre_names: list[str], explain_names: list[str], history_len: int):
        self.genre_names, self.explain_names, self.history_len = genre_names, explain_names, history_len

    def ranked(self, ctx: UserContext, catalog: Catalog, c: Candidates, opts: RecommendOptions) -> list[Entry]:
        """The top-k of ``c`` as entries (and ``c.top`` set, for the trace)."""
        c.top = c.order(opts.k)
        return [(int(c.items[i]), float(c.recall[i]), None if c.ranking is None else float(c.ranking[i]), int(i), None,
                 self._reasons(ctx, catalog, c, int(i)) if opts.explain else None, c.source(i)) for i in c.top]

    @staticmethod
    def popular(catalog: Catalog, rows: np.ndarray) -> list[Entry]:
        pop = catalog.arrays["popularity"]
        return [(int(i), None, None, None, float(pop[i]), None, None) for i in rows]

    def response(self, ctx: UserContext, catalog: Catalog, entries: list[Entry], fallback: str | None,
                 opts: RecommendOptions, cands: Candidates | None = None) -> dict:
        rows = np.fromiter((entry[0] for entry in entries), np.int64, len(entries))
        items = [{**described, "recall_score": entry[1], "recall_rank": entry[3], "ranking_score": entry[2],
                  "popularity": entry[4], "source": entry[6]} for described, entry in zip(self.describe(catalog, rows), entries)]
        if opts.explain:  # a fallback's entries have no explanation: no key, as before
            for item, entry in zip(items, entries):
                if entry[5] is not None:
                    item["features"] = entry[5]
        out = {"user_id": ctx.raw_id, "fallback": fallback, "items": items}
        if opts.trace:
            out["trace"] = {"history": self._history(ctx, catalog), "history_length": len(ctx.hist_items),
                            "candidates": [] if cands is None else cands.trace(catalog)}
        return out

    def item(self, catalog: Catalog, row: int, recall_score, ranking_score, recall_rank, popularity=None, features=None,
             source=None) -> dict:
        (out,) = self.describe(catalog, np.array([row]))
        out.update(recall_score=recall_score, recall_rank=recall_rank, ranking_score=ranking_score, popularity=popularity,
                   source=source)
        if features is not None:
            out["features"] = features
        return out

    def describe(self, catalog: Catalog, rows: np.ndarray) -> list[dict]:
        """Each row's id, title, genre names and year: the items' part of an answer, read in one gather per array."""
        years = catalog.arrays["item_year"][rows].tolist()
        has, genre = np.nonzero(catalog.arrays["item_genres"][rows])
        names: list[list[str]] = [[] for _ in range(len(rows))]
        for i, g in zip(has.tolist(), genre.tolist()):
            names[i].append(self.genre_names[g])
        return [{"item_id": catalog.ids[row], "title": catalog.titles[row], "genres": names[i],
                 "year": None if year != year else int(year)}  # NaN: unknown year
                for i, (row, year) in enumerate(zip(rows.tolist(), years))]

    def _reasons(self, ctx: UserContext, catalog: Catalog, c: Candidates, i: int) -> dict:
        """An answer's explanation: the ranker's features of candidate ``i``, or the recall reasons without a ranker."""
        if c.ranking is None:
            return self._recall_reasons(ctx, catalog, int(c.items[i]), float(c.recall[i]), i)
        return dict(zip(self.explain_names, c.features[i].round(5).tolist()))

    def _recall_reasons(self, ctx: UserContext, catalog: Catalog, row: int, score: float, rank: int) -> dict:
        """Without a ranker the reason is the recall stage's: its score and rank, and the recent history
        item whose vector lies nearest the candidate ("because you watched ...")."""
        out: dict = {"recall_score": round(score, 5), "recall_rank": rank}
        recent = ctx.hist_items[-self.history_len :]
        if len(recent):
            sims = catalog.vectors[recent] @ catalog.vectors[row]
            j = int(np.argmax(sims))
            out.update(nearest_history_item=catalog.ids[int(recent[j])], nearest_history_similarity=round(float(sims[j]), 5))
        return out

    def _history(self, ctx: UserContext, catalog: Catalog) -> list[dict]:
        """The most recent ``TRACE_HISTORY`` interactions, most recent first (items sent as recent_items have
        no time and no rating)."""
        recent = np.arange(len(ctx.hist_items))[::-1][:TRACE_HISTORY]
        return [{"item_id": catalog.ids[row], "title": catalog.titles[row],
                 "rating": None if np.isnan(ctx.hist_times[i]) else float(ctx.hist_ratings[i]),
                 "timestamp": None if np.isnan(ctx.hist_times[i]) else int(ctx.hist_times[i])}
                for i, row in zip(recent, ctx.hist_items[recent].tolist())]
