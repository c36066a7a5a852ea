"""The live engine plus the state store, and the one way catalogue changes reach an engine.

Events need no replay: every request reads the user's online history from the store (in memory for
the file backend, one MULTI for Redis), so a new engine serves them as soon as it is live, and an
event recorded on any replica changes every replica's next answer. Catalogue changes do need
applying, since each engine holds its own index: they are applied in the store's order, under one
lock, to the live engine. A write applies its own change before it returns (read-your-writes);
with a shared store, a background thread also applies other replicas' changes as they land.

A new engine (start-up or reload) gets the store's catalogue fold applied while the old engine keeps
serving and writing, outside any lock; only the changes acknowledged meanwhile are applied under the
follower's lock, right before the swap.
"""
from __future__ import annotations

import functools
import threading
from dataclasses import dataclass
from pathlib import Path

from loguru import logger

from recsys import metrics
from recsys.bundle import BundleError, read_bundle, resolve
from recsys.engine.engine import Engine
from recsys.engine.filters import EXACT_LIMIT
from recsys.errors import RecsysError
from recsys.query import Item
from recsys.state.open import StoreConfig, open_store
from recsys.state.protocol import Event, Position, StateStore, StoreUnavailable

FOLLOW_WAIT_S = 1.0  # how long one blocking read for other replicas' changes waits


@dataclass(frozen=True)
class LiveConfig:
    """What a live engine needs to know: where bundles are, how to build engines, whether to watch and follow."""

    bundle_dir: Path
    store: StoreConfig
    index_threads: int = 1
    user_vector_cache: int = 100_000
    filter_exact_limit: int = EXACT_LIMIT
    bundle_poll_s: float = 0.0  # > 0: reload when the root's ``current`` names another version
    follow: bool = False  # a shared store: apply other replicas' catalogue changes as they land


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
        try:
            self.install(self.build(config.bundle_dir))
        except BaseException:
            self.store.close()  # a failed start must not keep the state directory locked
            raise
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
        bundle = read_bundle(path, index_threads=self.config.index_threads)
        try:
            engine = Engine.from_bundle(bundle, self.config.user_vector_cache, self.config.filter_exact_limit)
            after = bundle.meta.events_after(self.store.source)  # no event counts twice (bundle history and online)
        except StoreUnavailable:
            raise  # the store, not the bundle: a reload retries later
        except Exception as err:
            raise BundleError(f"{bundle.path}: cannot serve this bundle ({type(err).__name__}: {err})") from err
        engine.history = functools.partial(self.store.history, after=after)
        return engine

    def install(self, engine: Engine) -> None:
        """Apply the catalogue to ``engine`` and make it the live one (see the module docstring).
        Raises ``StoreUnavailable`` when the store cannot be read: a bundle without its catalogue
        changes would serve removed items."""
        items, position = self.store.catalog()
        engine.changes.load(items)
        with self.follow_lock:
            position = self._apply(engine, position)
            self.engine, self.position = engine, position
        metrics.set_bundle(engine.version, engine.searchable_items)

    def reload(self, path: Path) -> tuple[str, str]:
        """Load the bundle at ``path`` beside the live one and swap it in; returns (old, new) versions.
        On any failure the old bundle keeps serving, the failure is counted and logged, and it is raised."""
        with self.reload_lock:
            old = self.engine.version
            try:
                engine = self.build(path)
                self.install(engine)
            except (BundleError, OSError, StoreUnavailable) as err:
                metrics.RELOADS.labels("failed").inc()
                logger.warning("reload of {} failed, still serving {}: {}", path, old, err)
                raise
        metrics.RELOADS.labels("ok").inc()
        logger.info("reloaded: {} -> {}", old, engine.version)
        return old, engine.version

    def _watch_bundle(self) -> None:
        """Reload by itself when the bundle root's ``current`` names another version: a trainer on the shared
        volume promotes, every replica follows within ``bundle_poll_s`` (Triton's poll mode). A version that
        is broken is not retried until ``current`` moves again; a store outage or an I/O error during the load
        is retried at the next poll. Nothing stops the watcher but ``close``."""
        broken: Path | None = None
        while not self._stop.wait(self.config.bundle_poll_s):
            try:
                target = resolve(self.config.bundle_dir)
                if target in (self.engine.bundle.path, broken):
                    continue
                self.reload(self.config.bundle_dir)
                broken = None
            except BundleError:
                broken = target if "target" in locals() else None
            except (OSError, StoreUnavailable) as err:  # a blip: the next poll tries again
                logger.warning("bundle watcher: {}", err)
            except Exception:
                logger.opt(exception=True).error("bundle watcher: unexpected failure; retrying at the next poll")

    # ------------------------------------------------------------------ writes
    def record_event(self, user_id: str, event: Event) -> int:
        """Durably recorded before it is acknowledged; every later read sees it. Returns the history length."""
        engine = self.engine
        engine.changes.require_item(event.item_id)
        version = self.store.append_event(user_id, event)
        return engine.users.history_length(user_id, version)

    def upsert_items(self, items: list[Item]) -> dict:
        """Checked first (a bad item is refused before anything is recorded), then recorded, then applied in
        store order together with whatever other replicas changed before it."""
        status = self.engine.changes.check(items)
        for item in items:
            self.store.append_change(str(item.item_id), item.to_record())
        self._catch_up_after_write()
        return {"item_id": str(items[-1].item_id), "status": status[-1]}

    def remove_item(self, item_id: str) -> dict:
        self.engine.changes.require_item(item_id)  # a 404 is not recorded
        self.store.append_change(item_id, None)
        self._catch_up_after_write()
        return {"item_id": item_id, "status": "removed"}

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
            self.position = self._apply(self.engine, self.position, changes)
        metrics.INDEX_ITEMS.set(self.engine.searchable_items)

    def _apply(self, engine: Engine, position: Position, changes: list | None = None) -> Position:
        """Changes after ``position``, in order, onto ``engine``; returns the new position. Changes read
        before the lock was taken may start before ``position``: those are already applied and skipped.
        If the store no longer keeps what came after ``position``, the whole fold is applied again."""
        try:
            changes = self.store.changes_since(position) if changes is None else changes
        except LookupError as err:
            logger.warning("{}; re-reading the catalogue", err)
            items, position = self.store.catalog()
            engine.changes.load(items)
            return self._apply(engine, position)
        for at, item_id, item in changes:
            if at <= position:
                continue
            try:
                engine.changes.apply(item_id, item)
            except (RecsysError, ValueError) as err:  # e.g. a genre this bundle lacks, an entry edited by hand
                logger.warning("catalogue change {} for {} skipped on bundle {}: {}", at, item_id, engine.version,
                               getattr(err, "message", err))
            position = at
        return position

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

    def close(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=FOLLOW_WAIT_S + 1)
        self.store.close()
