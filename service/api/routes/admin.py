"""Admin: catalogue changes and bundle reloads, behind the bearer token."""
from __future__ import annotations

from fastapi import APIRouter

from recsys.bundle import BundleError
from recsys.live import Written
from recsys.text import TextModelError
from service.api.deps import ADMIN, IdempotencyKey, LiveDep, PathId, ServedSettings, once, replay_headers
from service.api.errors import ApiError
from service.http import FastJSONResponse, errors
from service.schemas import ItemBatch, ItemBatchResponse, ItemChangeResponse, ItemUpsert, ReloadRequest, ReloadResponse

router = APIRouter(**ADMIN)


@router.put("/admin/items", response_model=ItemChangeResponse, responses=errors(400, 401, 403, 408, 413, 422, 503))
@router.post("/admin/items", response_model=ItemChangeResponse, responses=errors(400, 401, 403, 408, 413, 422, 503))
def upsert_item(body: ItemUpsert, live: LiveDep, idempotency_key: IdempotencyKey = None):
    """Add an item or replace one (same id): item tower for its vector, then live in the index.
    Validated and encoded first, fsynced to the catalogue log, then made live: acknowledged means durable."""
    return _written(live.upsert_items([body.to_core()], once=once(idempotency_key, ["upsert", body.model_dump(mode="json")])))


@router.post("/admin/items:batch", response_model=ItemBatchResponse, responses=errors(400, 401, 403, 408, 413, 422, 503))
def upsert_items(body: ItemBatch, live: LiveDep, idempotency_key: IdempotencyKey = None):
    """Add or replace many items in one call: all are checked before any is recorded (one bad item refuses the
    call), then recorded in order, atomically, and made live together (one item tower call, one text encoder call)."""
    key = once(idempotency_key, ["batch", body.model_dump(mode="json")])
    return _written(live.upsert_items([item.to_core() for item in body.items], each=True, once=key))


@router.delete("/admin/items/{item_id:path}", response_model=ItemChangeResponse, responses=errors(401, 403, 404, 422, 503))
def remove_item(item_id: PathId, live: LiveDep, idempotency_key: IdempotencyKey = None):
    """With a key, a retry after the item is gone answers the first removal again instead of 404."""
    return _written(live.remove_item(item_id, once(idempotency_key, ["remove", item_id])))


def _written(written: Written) -> FastJSONResponse:
    return FastJSONResponse(written.body, headers=replay_headers(written.replayed))


@router.post("/admin/reload", response_model=ReloadResponse, responses=errors(400, 401, 403, 408, 409, 413, 422, 503))
def reload_bundle(live: LiveDep, settings: ServedSettings, body: ReloadRequest | None = None):
    """Load a bundle beside the live one and swap it in; on any failure (409) the old one keeps serving."""
    path = settings.bundle_dir / body.version if body and body.version else settings.bundle_dir
    try:
        old, new = live.reload(path)
    except (BundleError, OSError, TextModelError) as err:
        raise ApiError(409, f"reload failed, still serving {live.engine.version}: {err}") from err
    except MemoryError as err:
        raise ApiError(409, f"reload failed, still serving {live.engine.version}: not enough memory for two bundles") from err
    return FastJSONResponse({"status": "reloaded", "previous_version": old, "bundle_version": new})
