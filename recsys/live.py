"""The live engine plus the state store, and the one way catalogue changes reach an engine.

Events need no replay: every request reads the user's online history from the store (in memory for
the file backend, one script for Redis, awaited by ``/recommend`` on its event loop), so a new engine
serves them as soon as it is live, and an event recorded on any replica changes every replica's next
answer. Catalogue changes do need applying, since each engine holds its own index: they are applied in
the store's order, under one lock, to the live engine. A write applies its own change before it returns
(read-your-writes); with a shared store, a background thread also applies other replicas' changes as
they land.

A new engine (start-up or reload) gets the store's catalogue fold applied while the old engine keeps
serving and writing, outside any lock; only the changes acknowledged meanwhile are applied under the
follower's lock, right before the swap.
"""
from __future__ import annotations

import dataclasses
import functools
import gc
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import orjson
from loguru import logger

from recsys import metrics
from recsys.bundle import BundleError, read_bundle, resolve
from recsys.engine.allowed import FILTER_CACHE_MB
from recsys.engine.engine import BatchAnswer, Engine, Fetched, UserQuery
from recsys.engine.filters import EXACT_LIMIT
from recsys.errors import InvalidInput, RecsysError, UnknownId
from recsys.experiments.definition import Experiment, Plan
from recsys.experiments.registry import Registry
from recsys.experiments.report import feedback_type
from recsys.experiments.serving import Served, serve
from recsys.impressions import ImpressionConfig, ImpressionLog, Joined, join
from recsys.query import Item, RecommendOptions, RecommendRequest
from recsys.state.open import StoreConfig, open_store
from recsys.state.protocol import CHANGES_PAGE, AlreadyRecorded, Event, Once, Position, StateStore, StoreUnavailable

FOLLOW_WAIT_S = 1.0  # how long one blocking read for other replicas' changes waits


@dataclass(frozen=True)
class LiveConfig:
    """What a live engine needs to know: where bundles are, how to build engines, whether to watch and follow."""

    bundle_dir: Path
    store: StoreConfig
    index_threads: int = 1
    index_ef: int | None = None  # the HNSW search beam; None: the bundle's
    index_insert_ef: int | None = None  # the HNSW insertion beam for items changed online; None: the bundle's
    user_vector_cache: int = 100_000
    filter_exact_limit: int = EXACT_LIMIT
    filter_cache_mb: float = FILTER_CACHE_MB
    bundle_poll_s: float = 0.0  # > 0: reload when the root's ``current`` names another version
    follow: bool = False  # a shared store: apply other replicas' catalogue changes as they land
    impressions: ImpressionConfig | None = field(default_factory=ImpressionConfig)  # None: no impressions logged
    positive_types: frozenset[str] = frozenset({"click", "add_to_cart", "purchase"})  # feedback counted as a click
    max_experiments: int = 20
    experiments_poll_s: float = 1.0  # a shared store: how often definitions made elsewhere are re-read


@dataclass(frozen=True)
class Recorded:
    """An event recorded: the user's history length, how its feedback joined its impression (if it named one), and
    whether this was the retry of an event recorded before under the same idempotency key (nothing recorded again)."""

    history_length: int
    joined: Joined | None = None
    replayed: bool = False


class Written(NamedTuple):
    """A catalogue write's answer, and whether it is the stored answer of an earlier write under the same key."""

    body: dict
    replayed: bool = False


def settle_heap(collect: bool) -> None:
    """Everything alive, the engines just loaded with it, frozen out of the cyclic collector's way (``gc.freeze``).
    A serving process is hundreds of thousands of long-lived objects (at 1M items, 0.43M: a full collection over
    them held the GIL for 260 ms), and a full collection comes whenever enough objects (cached users, say) have
    survived into the oldest generation: each one would stall every request in flight. Frozen, a full collection
    walks only what is younger. With ``collect`` (an engine was swapped out or dropped), what an earlier call froze
    is collected first, the dropped engine's reference cycles with it: one full collection per swap, which those
    cycles would have cost anyway. ``LiveEngine.close`` unfreezes."""
    if collect:
        gc.unfreeze()
        gc.collect()
    gc.freeze()


def _same_request(once: Once, seen: AlreadyRecorded) -> AlreadyRecorded:
    """The earlier write under ``once``'s key, when it carried the same request; else the key was reused for another
    write, which is refused rather than silently dropped."""
    if seen.digest != once.digest:
        raise InvalidInput(f"idempotency key {once.key!r} was already used for a different request within the "
                           "idempotency window: use a new key for a new write")
    return seen


class LiveEngine:
    """The engine being served over the state store: built from a bundle at start, swapped whole on reload,
    kept in step with the catalogue; the writes (events, catalogue changes) go through it."""

    def __init__(self, config: LiveConfig, store: StateStore | None = None):
        self.config = config
        self.store = store or open_store(config.store)
        self.follow_lock = threading.Lock()  # orders catalogue changes and engine swaps
        self.position: Position = (0, 0)  # the last change applied to ``engine``
        self.engine: Engine | None = None
        self.reload_lock = threading.Lock()  # one reload at a time (the admin route and the watcher)
        self._stop = threading.Event()
        self.variant_engines: dict[str, list] = {}  # bundle version -> [engine, position]: bundles experiments serve
        try:
            self.install(self.build(config.bundle_dir))
            settle_heap(collect=False)
            self.experiments = Registry(self.store, self._load_variant_bundles, config.max_experiments,
                                        config.experiments_poll_s if config.follow else 0.0)
        except BaseException:
            self.store.close()  # a failed start must not keep the state directory locked
            raise
        self.impressions = None if config.impressions is None else ImpressionLog(self.store, config.impressions)
        self._threads = []
        if config.follow:
            self._threads.append(threading.Thread(target=self._follow, name="catalog-follower", daemon=True))
        if config.bundle_poll_s > 0:
            self._threads.append(threading.Thread(target=self._watch_bundle, name="bundle-watcher", daemon=True))
        for thread in self._threads:
            thread.start()

    def build(self, path: Path) -> Engine:
        """Read and validate a bundle into a new engine, beside whatever is serving. Any failure is a
        ``BundleError`` (a ranker state the code cannot load, a feature spec with wrong fields, ...),
        so start-up refuses with a message and a reload answers 409, never 500."""
        bundle = read_bundle(path, index_threads=self.config.index_threads, index_ef=self.config.index_ef,
                             index_insert_ef=self.config.index_insert_ef)
        try:
            engine = Engine.from_bundle(bundle, self.config.user_vector_cache, self.config.filter_exact_limit,
                                        self.config.filter_cache_mb)
            after = bundle.meta.events_after(self.store.source)  # no event counts twice (bundle history and online)
        except (StoreUnavailable, OSError, MemoryError):
            raise  # the store or the machine, not the bundle: a reload retries later
        except Exception as err:
            raise BundleError(f"{bundle.path}: cannot serve this bundle ({type(err).__name__}: {err})") from err
        engine.history = functools.partial(self.store.history, after=after)
        engine.users.history_async = functools.partial(self.store.history_async, after=after)
        engine.users.events_in_bundle = after is not None
        return engine

    def install(self, engine: Engine) -> None:
        """Apply the catalogue to ``engine`` and make it the live one (see the module docstring).
        Raises ``StoreUnavailable`` when the store cannot be read: a bundle without its catalogue
        changes would serve removed items."""
        items, position = self.store.catalog()
        engine.changes.load(items)
        with self.follow_lock:
            position = self._apply(engine, position)
            if self.engine is not None:
                self.engine.live.report_backlog = None  # (the old engine's merge may still run: it no longer reports)
            self.engine, self.position = engine, position
        engine.live.report_backlog = metrics.UNINDEXED.set
        metrics.UNINDEXED.set(len(engine.live.unindexed))
        metrics.set_bundle(engine.version, engine.searchable_items)

    def reload(self, path: Path) -> tuple[str, str]:
        """Load the bundle at ``path`` beside the live one and swap it in; returns (old, new) versions.
        On any failure the old bundle keeps serving, the failure is counted and logged, and it is raised."""
        with self.reload_lock:
            old = self.engine.version
            try:
                engine = self.build(path)
                self.install(engine)
            except (BundleError, OSError, MemoryError, StoreUnavailable) as err:
                metrics.RELOADS.labels("failed").inc()
                logger.warning("reload of {} failed, still serving {}: {}", path, old, err)
                raise
        metrics.RELOADS.labels("ok").inc()
        logger.info("reloaded: {} -> {}", old, engine.version)
        settle_heap(collect=True)  # (after the reload is counted: the collection takes a while)
        return old, engine.version

    def _watch_bundle(self) -> None:
        """Reload by itself when the bundle root's ``current`` names another version: a trainer on the shared
        volume promotes, every replica follows within ``bundle_poll_s`` (Triton's poll mode). A version that
        is broken is not retried until ``current`` moves again; a store outage or an I/O error during the load
        is retried at the next poll. Nothing stops the watcher but ``close``."""
        broken: Path | None = None
        while not self._stop.wait(self.config.bundle_poll_s):
            target = None
            try:
                target = resolve(self.config.bundle_dir)
                if target not in (self.engine.bundle.path, broken):
                    self.reload(self.config.bundle_dir)
                    broken = None
            except BundleError as err:
                if target is None:  # `current` names nothing servable (a typo, a version removed): said once
                    if broken != self.config.bundle_dir:
                        logger.warning("bundle watcher: {}", err)
                    target = broken = self.config.bundle_dir
                else:
                    broken = target
            except (OSError, MemoryError, StoreUnavailable) as err:  # a blip: the next poll tries again
                logger.warning("bundle watcher: {}", err)
            except Exception:
                logger.opt(exception=True).error("bundle watcher: unexpected failure; retrying at the next poll")
            metrics.BEHIND.set(target is not None and target != self.engine.bundle.path)  # the alert's signal

    # ------------------------------------------------------------------ answers under the running experiments
    async def recommend(self, req: RecommendRequest, default_candidates: int | None = None) -> dict:
        """One user, as ``Engine.recommend`` answers, in the variants the experiments assign them, with a request id
        and the assignments; the impression is logged. Awaited on the event loop: the user's history is awaited (for
        every engine the user's plan runs), then the answer is computed on the loop itself. A thread hand-off per
        request cost more than it saved: the loop and the worker traded the GIL on every release inside numpy and
        torch, and a saturated worker spent half again the CPU per request. An engine swapped in between the read
        and the answer reads its own history (at once from memory; on Redis the loop waits for that one read)."""
        user = (req.user_id, req.features, req.recent_items)
        plan = self.experiments.plan(None if req.user_id is None else str(req.user_id))
        fetched = {engine: await engine.read_histories([user]) for engine in self._engines_of(plan)}
        served = self._serve([user], req, default_candidates, metrics.STAGE, [plan], fetched)
        (answer,) = served.answers
        if isinstance(answer, RecsysError):
            raise answer
        return {**answer, "timings_ms": served.timings}

    def _engines_of(self, plan: Plan) -> list[Engine]:
        """The engines ``_serve`` runs for a user of this plan: the served configuration's, both of an interleaving's,
        each shadow's."""
        configs = [plan.options] + [{**plan.options, **o} for o in (plan.interleave or (None,))[1:]]
        configs += [{**plan.options, **o} for _, _, o in plan.shadows]
        return list(dict.fromkeys(self.engine_for(c.get("bundle")) for c in configs))

    def recommend_batch(self, user_ids: Sequence[str | int], opts: RecommendOptions, default_candidates: int | None = None,
                        histogram=metrics.BATCH_STAGE) -> BatchAnswer:
        served = self._serve([(user, None, None) for user in user_ids], opts, default_candidates, histogram)
        return BatchAnswer(list(user_ids), served.answers, self.engine.version, served.timings)

    def _serve(self, users: list[UserQuery], opts: RecommendOptions, default_candidates: int | None, histogram,
               plans: list[Plan] | None = None, fetched: dict[Engine, Fetched] | None = None) -> Served:
        """``plans``: the users' experiment plans, when the caller made them already; ``fetched``: their histories
        read already, per engine."""
        plans = plans or [self.experiments.plan(None if user is None else str(user)) for user, _, _ in users]

        def run(options: dict, places: list[int]):
            engine = self.engine_for(options.get("bundle"))
            o = dataclasses.replace(opts, candidates=options["candidates"]) if "candidates" in options else opts
            read = None if fetched is None or engine not in fetched else fetched[engine].of(places)
            answers, timings = engine.recommend_users([users[i] for i in places], o, default_candidates, histogram,
                                                      ranker=options.get("ranker", True), item_item=options.get("item_item", True),
                                                      popularity=options.get("popularity", False), fetched=read)
            for a in answers:
                if not isinstance(a, RecsysError):
                    a["bundle_version"] = engine.version
            return answers, timings, engine.version

        served = serve(users, plans, opts.k, run)
        for record in served.impressions:
            if record.get("shadow") is None:
                self.experiments.count_impression(record["assignments"], record["latency_ms"] / 1000)
            if self.impressions is not None:
                self.impressions.offer(record)
        return served

    @property
    def feedback_window_s(self) -> int:
        """How long after an impression feedback joins it (no impressions logged: nothing to join)."""
        return self.config.impressions.feedback_window_s if self.config.impressions else 0

    def engine_for(self, bundle: str | None) -> Engine:
        """The engine serving ``bundle`` (a version an experiment's variant names; None or "current": the live one)."""
        if bundle in (None, "current"):
            return self.engine
        entry = self.variant_engines.get(bundle)
        return self.engine if entry is None else entry[0]

    # ------------------------------------------------------------------ experiments
    def define_experiment(self, exp: Experiment) -> tuple[Experiment, bool]:
        return self.experiments.define(exp)

    def delete_experiment(self, name: str) -> None:
        if not self.experiments.delete(name):
            raise UnknownId(f"no experiment named {name!r}")

    def experiment_report(self, name: str) -> dict:
        body = self.experiments.report(name, set(self.config.positive_types), self.feedback_window_s)
        if body is None:
            raise UnknownId(f"no experiment named {name!r}")
        return body

    def _load_variant_bundles(self, experiments: list[Experiment], strict: bool = True) -> set[str]:
        """Load every bundle the variants name (beside the live one, its catalogue changes applied, then kept in
        step by the follower) and drop those no longer named. An unknown or broken version is ``InvalidInput``;
        not ``strict``, it is logged and skipped, and the versions that failed are returned."""
        wanted = {v.bundle for e in experiments for v in e.variants if v.bundle not in (None, "current")}
        root = self.config.bundle_dir if not (self.config.bundle_dir / "manifest.json").exists() else self.config.bundle_dir.parent
        failed: set[str] = set()
        loaded = []
        for version in sorted(wanted - set(self.variant_engines)):
            try:
                engine = self._variant_engine(root, version)
            except InvalidInput as err:
                if strict:
                    raise
                logger.warning("{}", err)
                failed.add(version)
                continue
            loaded.append(version)
            items, position = self.store.catalog()
            engine.changes.load(items)
            with self.follow_lock:
                self.variant_engines[version] = [engine, self._apply(engine, position)]
            logger.info("bundle {} loaded for experiments", version)
        with self.follow_lock:
            dropped = set(self.variant_engines) - wanted
            for version in dropped:
                del self.variant_engines[version]
        if loaded or dropped:  # (not on every change of the definitions: a freeze keeps the young garbage too)
            settle_heap(collect=bool(dropped))
        return failed

    def _variant_engine(self, root: Path, version: str) -> Engine:
        """The engine of bundle ``version`` under the bundle root, or ``InvalidInput`` saying why it cannot be."""
        if not (root / version / "manifest.json").exists():
            raise InvalidInput(f"unknown bundle {version!r}: no {root / version / 'manifest.json'}")
        try:
            return self.build(root / version)
        except (BundleError, OSError, MemoryError) as err:
            raise InvalidInput(f"bundle {version!r} cannot be served: {err or type(err).__name__}") from err

    # ------------------------------------------------------------------ writes
    def record_event(self, user_id: str, event: Event, once: Once | None = None) -> Recorded:
        """Durably recorded before it is acknowledged; every later read sees it. Feedback naming a request is
        joined to that request's impression first (its position filled in from the impression when not given;
        a position that contradicts it is refused) and counted for the impression's experiments. With an
        idempotency key (``once``), a retry of an event already recorded is answered as the first time (its
        join; the history as it is now) and neither recorded nor counted again."""
        engine = self.engine
        seen = self._unless_replayed(lambda: engine.changes.require_item(event.item_id), once, user_id)
        if seen is None:
            joined, impression = None, None
            if event.request_id is not None:
                window = self.config.impressions.feedback_window_s if self.config.impressions else 0
                queued = self.impressions.find(event.request_id) if self.impressions is not None else None
                impression = queued or self.store.impression(event.request_id)
                joined = join(impression, user_id, event.item_id, event.position, event.timestamp, window)
                if joined.position is not None:
                    event = event._replace(position=joined.position)
            answer = orjson.dumps(dataclasses.asdict(joined)).decode() if joined is not None else ""
            try:
                version = self.store.append_event(user_id, event, once and once._replace(answer=answer))
            except AlreadyRecorded as err:
                seen = _same_request(once, err)
            else:
                if joined is not None and joined.position is not None:
                    kind = feedback_type(event)
                    self.experiments.count_feedback(impression, kind, joined.position, kind in self.config.positive_types)
                return Recorded(engine.users.history_length(user_id, version), joined)
        joined = Joined(**orjson.loads(seen.answer)) if seen.answer else None
        return Recorded(engine.users.history_length(user_id, seen.version), joined, replayed=True)

    def upsert_items(self, items: list[Item], each: bool = False, once: Once | None = None) -> Written:
        """Checked first (a bad item is refused before anything is recorded), then recorded, then applied in
        store order together with whatever other replicas changed before it (one batch: ``catch_up``).
        Answers the last item's status, or (``each``) every item's."""
        status = self.engine.changes.check(items)
        answers = [{"item_id": str(item.item_id), "status": s} for item, s in zip(items, status)]
        body = {"items": answers} if each else answers[-1]
        return self._write_changes([(str(item.item_id), item.to_record()) for item in items], body, once)

    def remove_item(self, item_id: str, once: Once | None = None) -> Written:
        seen = self._unless_replayed(lambda: self.engine.changes.require_item(item_id), once)  # a 404 is not recorded
        if seen is not None:
            return Written(orjson.loads(seen.answer), replayed=True)
        return self._write_changes([(item_id, None)], {"item_id": item_id, "status": "removed"}, once)

    def _write_changes(self, changes: list[tuple[str, dict | None]], body: dict, once: Once | None) -> Written:
        """Record the changes (one durable write), then apply them here; with a key already used, nothing is recorded
        and the first write's answer is given back (applying what the store holds: the first write may have
        committed after its caller gave up)."""
        try:
            self.store.append_changes(changes, once and once._replace(answer=orjson.dumps(body).decode()))
            written = Written(body)
        except AlreadyRecorded as err:
            written = Written(orjson.loads(_same_request(once, err).answer), replayed=True)
        self._catch_up_after_write()
        return written

    def _unless_replayed(self, check: Callable[[], object], once: Once | None, user_id: str | None = None) -> AlreadyRecorded | None:
        """Run ``check`` (an item that must exist); when it refuses a keyed write, the write may be the retry of one
        that succeeded (a removal's retry finds the item gone): the earlier write under the key, if the store holds
        one, else the refusal. Costs nothing on the path of a write that passes."""
        try:
            check()
        except UnknownId:
            seen = self.store.previous_write(once.key, user_id) if once is not None else None
            if seen is None:
                raise
            return _same_request(once, seen)
        return None

    def _catch_up_after_write(self) -> None:
        """Apply the change just recorded (read-your-writes). It is durable already: if the store cannot be
        read back right now, the change is still acknowledged, and the follower applies it when it can."""
        try:
            self.catch_up()
        except StoreUnavailable as err:
            logger.warning("recorded, but not yet applied here ({}); the catalogue follower will apply it", err)

    # ------------------------------------------------------------------ following the catalogue
    def catch_up(self, wait_s: float = 0.0) -> None:
        """Apply every change after ``position`` to the live engine (waiting up to ``wait_s`` for one)."""
        try:
            changes = self.store.changes_since(self.position, wait_s) if wait_s else None
        except LookupError:  # fell behind the trimmed stream: ``_apply`` re-reads the fold
            changes = None
        with self.follow_lock:
            start, self.position = self.position, self._apply(self.engine, self.position, changes)
            for entry in self.variant_engines.values():  # the changes read, to those that were where the live one was
                entry[1] = self._apply(entry[0], entry[1], changes if entry[1] >= start else None)
        metrics.INDEX_ITEMS.set(self.engine.searchable_items)

    def _apply(self, engine: Engine, position: Position, changes: list | None = None) -> Position:
        """Every change after ``position``, in order, onto ``engine`` (``changes``: the first page, already read);
        returns the new position. Changes read before the lock was taken may start before ``position``: those are
        already applied and skipped. A page at a time, so that requests run between them; if the store no longer
        keeps what came after ``position``, the whole fold is applied again."""
        while True:
            try:
                changes = self.store.changes_since(position) if changes is None else changes
            except LookupError as err:
                logger.warning("{}; re-reading the catalogue", err)
                items, position = self.store.catalog()
                engine.changes.load(items)
                continue
            fresh = [(at, item_id, item) for at, item_id, item in changes if at > position]
            if fresh:  # e.g. a genre this bundle lacks, an entry edited by hand: skipped, logged
                for reason in engine.changes.apply_all([(item_id, item) for _, item_id, item in fresh]):
                    logger.warning("catalogue change skipped on bundle {}: {}", engine.version, reason)
                position = fresh[-1][0]
            if len(changes) < CHANGES_PAGE:
                return position
            changes = None

    def _follow(self) -> None:
        """Other replicas' changes, applied as they land; retried with a pause while the store is down."""
        while not self._stop.is_set():
            try:
                self.catch_up(wait_s=FOLLOW_WAIT_S)
            except StoreUnavailable as err:
                metrics.DEGRADED.labels("catalog_follow").inc()
                logger.warning("catalogue follower: {}", err)
                self._stop.wait(FOLLOW_WAIT_S)
            except Exception:  # never let the follower die silently: log, pause, go on
                logger.opt(exception=True).error("catalogue follower failed")
                self._stop.wait(FOLLOW_WAIT_S)

    def health(self) -> str | None:
        return self.store.health()

    async def aopen(self) -> None:
        """What the serving event loop reads through (the store's asyncio connections), opened on that loop before the
        first request."""
        await self.store.aopen()

    async def aclose(self) -> None:
        """What the serving event loop holds (the store's asyncio connections): closed on that loop, before ``close``."""
        await self.store.aclose()

    def close(self) -> None:
        self._stop.set()
        self.engine.live.report_backlog = None  # (its merge may outlive the service: the gauge is the process's)
        for thread in self._threads:
            thread.join(timeout=FOLLOW_WAIT_S + 1)
        self.experiments.close()
        if self.impressions is not None:
            self.impressions.flush()
            self.impressions.close()
        self.store.close()
        gc.unfreeze()  # (what settle_heap froze, this engine among it, collected as usual again)
