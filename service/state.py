"""The live engine plus the durable online state, and the one way an engine goes live.

A new engine (start-up or reload) gets the store's fold applied while the old engine keeps serving
and writing, outside any lock; only the short tail of records acknowledged meanwhile is applied
under ``write_lock``, right before the swap. So a reload never blocks ``/events`` for a whole replay,
and no acknowledged write lands on the old engine after the new one read the state.
"""
from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

from loguru import logger

from offline.bundle import BundleError, read_bundle
from service import metrics
from service.config import Settings
from service.engine import Engine, RequestError
from service.schemas import ItemUpsert
from service.store import Event, FileStateStore


class ServiceState:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.store = FileStateStore(settings.resolved_state_dir, settings.history_cap, settings.compact_after)
        self.write_lock = threading.RLock()
        self.engine: Engine | None = None
        self.install(self.build(settings.bundle_dir))

    def build(self, path: Path) -> Engine:
        """Read and validate a bundle into a new engine, beside whatever is serving. Any failure is a
        ``BundleError`` (a ranker state the code cannot load, a feature spec with wrong fields, ...),
        so start-up refuses with a message and a reload answers 409, never 500."""
        bundle = read_bundle(path, index_threads=self.settings.index_threads)
        try:
            return Engine.from_bundle(bundle, self.settings.user_vector_cache, self.settings.history_cap)
        except Exception as err:
            raise BundleError(f"{bundle.path}: cannot serve this bundle ({type(err).__name__}: {err})") from err

    def install(self, engine: Engine) -> None:
        """Apply the online state to ``engine`` and make it the live one (see the module docstring)."""
        online, offsets = self.store.state()
        engine.load_online(online)
        with self.write_lock:
            catch_up(engine, self.store.tail(offsets))
            self.engine = engine
        metrics.set_bundle(engine.version, engine.searchable_items)

    def record_event(self, user_id: str, event: Event) -> int:
        """Durably record, then apply: acknowledged means durable. Returns the user's history length."""
        with self.write_lock:
            engine = self.engine
            engine.require_item(event.item_id)
            version = self.store.append_event(user_id, event)
            return engine.apply_event(user_id, event, version)

    def upsert_items(self, items: list[ItemUpsert]) -> dict:
        """Validated and encoded, fsynced to the catalogue log, then made live."""
        with self.write_lock:
            change = self.engine.prepare_upsert(items)
            for item in items:
                self.store.append_change(str(item.item_id), item.model_dump())
            result = self.engine.commit_upsert(change)
        metrics.INDEX_ITEMS.set(self.engine.searchable_items)
        return result

    def remove_item(self, item_id: str) -> dict:
        with self.write_lock:
            self.engine.require_item(item_id)  # a 404 is not logged
            self.store.append_change(item_id, None)
            result = self.engine.remove_item(item_id)
        metrics.INDEX_ITEMS.set(self.engine.searchable_items)
        return result

    def close(self) -> None:
        self.store.close()


def catch_up(engine: Engine, records: list[tuple[str, Any]]) -> None:
    """Apply the records acknowledged after a fold, in order; ones that no longer apply are logged."""
    for kind, (key, value) in records:
        try:
            if kind == "event":
                engine.apply_event(key, value, engine.history_version(key) + 1, replay=True)
            elif value is not None:
                engine.commit_upsert(engine.prepare_upsert([ItemUpsert.model_validate(value)]))
            elif engine.catalog.row_of.get(key) is not None and engine.catalog.active[engine.catalog.row_of[key]]:
                engine.remove_item(key)
        except RequestError as err:
            logger.warning("online state on bundle {}: {} {} skipped ({})", engine.version, kind, key, err.message)
