"""The running experiments of one process: read from the state store (so every replica and worker runs the
same ones), planned per user, and reported from the store's impressions and feedback.

With a shared store a poller re-reads the definitions every ``poll_s`` seconds, loading any bundle a new
variant names before the new set takes effect (a variant is never served by a fallback while its bundle
loads); a definition made through this process takes effect here at once.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from loguru import logger
from prometheus_client import Counter, Histogram

from recsys.errors import InvalidInput
from recsys.experiments.definition import Experiment, Plan, check, check_against, plan
from recsys.experiments.interleave import NO_TEAM
from recsys.experiments.report import report
from recsys.metrics import LATENCY_BUCKETS
from recsys.state.protocol import StateStore, StoreUnavailable

CLICK_POSITIONS = 10  # positions with their own Prometheus series; later ones share "11+"
IMPRESSIONS = Counter("recsys_experiment_impressions_total", "Answers served per experiment and variant",
                      ["experiment", "variant"])
FEEDBACK = Counter("recsys_experiment_feedback_total", "Feedback joined to an impression, per experiment, variant "
                   "and feedback type", ["experiment", "variant", "type"])
CLICKS_AT = Counter("recsys_experiment_clicks_total", "Positive feedback joined to an impression, per experiment, "
                    "variant and 1-based position", ["experiment", "variant", "position"])
INTERLEAVE_CLICKS = Counter("recsys_interleave_clicks_total", "Positive feedback credited to an interleaving's team",
                            ["experiment", "team"])
LATENCY = Histogram("recsys_experiment_engine_seconds", "Engine time per answer, per experiment and variant",
                    ["experiment", "variant"], buckets=LATENCY_BUCKETS)
SERIES = (IMPRESSIONS, FEEDBACK, CLICKS_AT, INTERLEAVE_CLICKS, LATENCY)


class Registry:
    def __init__(self, store: StateStore, load_bundles: Callable[..., set[str]], max_experiments: int = 20,
                 poll_s: float = 0.0, report_ttl_s: float = 5.0):
        """``load_bundles(experiments, strict=True)``: load the bundles they name (and drop the rest); strict, an
        unservable one raises ``InvalidInput``, else it is skipped and returned among the versions that failed."""
        self.store, self.load_bundles, self.max_experiments = store, load_bundles, max_experiments
        self.running: dict[str, Experiment] = {}
        self._unservable: dict[str, dict] = {}  # name -> stored record whose bundle could not be loaded (not retried)
        self.lock = threading.Lock()  # one definition change at a time in this process
        self.report_ttl_s = report_ttl_s
        self._reports: dict[str, tuple[float, dict]] = {}
        self._retained: tuple[float, int, list[dict], list] | None = None  # (read at, since_ms, impressions, feedback)
        self._read_lock = threading.Lock()
        self._stop = threading.Event()
        self.refresh()
        self._thread = None
        if poll_s > 0:
            self._thread = threading.Thread(target=self._poll, args=(poll_s,), name="experiment-poller", daemon=True)
            self._thread.start()

    # ------------------------------------------------------------------ definitions
    def refresh(self) -> None:
        """Re-read the definitions; one the store holds but this code cannot run is logged and skipped: one this
        code cannot read, or one naming a bundle that cannot be served (deleted, or of a format this code refuses),
        which would otherwise stop every replica from starting. That one is tried again when its record changes."""
        running, records = {}, self.store.experiments()
        for name, record in records.items():
            if self._unservable.get(name) == record:
                continue
            try:
                running[name] = Experiment.from_record(record)
            except (ValueError, TypeError) as err:
                logger.warning("experiment {} in the store skipped: {}", name, err)
        if running != self.running:
            failed = self.load_bundles(list(running.values()), strict=False)
            for name, exp in list(running.items()):
                if unservable := sorted({v.bundle for v in exp.variants} & failed):
                    logger.warning("experiment {} in the store skipped: its bundle(s) {} cannot be served (tried again "
                                   "when it is redefined)", name, unservable)
                    self._unservable[name] = records[name]
                    del running[name]
            self._forget_series(set(self.running) - set(running))
            self.running = running

    def define(self, exp: Experiment) -> tuple[Experiment, bool]:
        """Check, load its bundles, store, run. Returns the experiment and whether it is new. Redefining an
        experiment restarts its clock (impressions under the old definition are not mixed into the new
        report) unless the definition is unchanged (a PUT repeated is a no-op)."""
        check(exp)
        with self.lock:
            self.refresh()
            old = self.running.get(exp.name)
            check_against(exp, self.running, self.max_experiments)
            same = old is not None and old.to_record() | {"started_ms": 0} == exp.to_record() | {"started_ms": 0}
            exp = Experiment(exp.name, exp.variants, exp.mode, exp.alpha, old.started_ms if same else int(time.time() * 1000))
            try:
                self.load_bundles([*self.running.values(), exp])
            except InvalidInput:  # refused: the bundles it alone named and that did load are dropped again
                self.load_bundles(list(self.running.values()), strict=False)
                raise
            self.store.put_experiment(exp.name, exp.to_record())
            self.running = {**self.running, exp.name: exp}
            self._reports.pop(exp.name, None)
        return exp, old is None

    def delete(self, name: str) -> bool:
        with self.lock:
            found = self.store.delete_experiment(name)
            self.refresh()
            self._forget_series({name})
        return found

    def plan(self, user_id: str | None) -> Plan:
        return plan(self.running, user_id)

    # ------------------------------------------------------------------ reports
    def report(self, name: str, positive: set[str], window_s: int) -> dict | None:
        """The experiment's report, recomputed from the store at most every ``report_ttl_s`` seconds."""
        exp = self.running.get(name)
        if exp is None:
            return None
        cached = self._reports.get(name)
        if cached is not None and time.monotonic() - cached[0] < self.report_ttl_s and cached[1]["started_ms"] == exp.started_ms:
            return cached[1]
        impressions, feedback = self._read(exp.started_ms)
        body = report(exp, impressions, feedback, positive, window_s)
        self._reports[name] = (time.monotonic(), body)
        return body

    def _read(self, since_ms: int) -> tuple[list[dict], list]:
        """The retained impressions and feedback since ``since_ms``: one read of the store per ``report_ttl_s``
        serves the reports of every experiment (reading it once per report made a dashboard of many
        experiments cost one full read each)."""
        with self._read_lock:
            cached = self._retained
            fresh = cached is not None and time.monotonic() - cached[0] < self.report_ttl_s and cached[1] <= since_ms
            if not fresh:
                since = min([since_ms, *(e.started_ms for e in self.running.values())])
                cached = (time.monotonic(), since, self.store.impressions_since(since), self.store.feedback_since(since))
                self._retained = cached
        _, _, impressions, feedback = cached
        return [r for r in impressions if r["ts_ms"] >= since_ms], feedback

    # ------------------------------------------------------------------ metrics
    def count_impression(self, assignments: dict[str, str], seconds: float | None) -> None:
        for exp, variant in assignments.items():
            IMPRESSIONS.labels(exp, variant).inc()
            if seconds is not None:
                LATENCY.labels(exp, variant).observe(seconds)

    def count_feedback(self, impression: dict, kind: str, position: int, positive: bool) -> None:
        """Feedback joined at ``position``: its type per variant; a positive one by position, and in an
        interleaving by the team that placed the item."""
        for exp, variant in impression.get("assignments", {}).items():
            if exp not in self.running:
                continue
            FEEDBACK.labels(exp, variant, kind).inc()
            if positive:
                CLICKS_AT.labels(exp, variant, str(position) if position <= CLICK_POSITIONS else f"{CLICK_POSITIONS + 1}+").inc()
                teams = impression.get("teams")
                if self.running[exp].mode == "interleave" and teams and position <= len(teams) \
                        and teams[position - 1] != NO_TEAM:
                    INTERLEAVE_CLICKS.labels(exp, teams[position - 1]).inc()

    @staticmethod
    def _forget_series(names: set[str]) -> None:
        """Drop a deleted experiment's series (in this process: with several workers the multiprocess files keep
        theirs until the workers restart), so label values stay bounded by the running experiments."""
        for metric in SERIES:
            for labels in list(metric._metrics):
                if labels[0] in names:
                    metric.remove(*labels)

    def _poll(self, poll_s: float) -> None:
        while not self._stop.wait(poll_s):
            try:
                with self.lock:
                    self.refresh()
            except StoreUnavailable as err:
                logger.warning("experiment poller: {}", err)
            except Exception:
                logger.opt(exception=True).error("experiment poller failed; retrying")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
