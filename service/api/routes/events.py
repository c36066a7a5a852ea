"""Interactions: ``POST /events``."""
from __future__ import annotations

import time

import anyio
from fastapi import APIRouter, Request

from recsys.state.protocol import Event
from service import metrics
from service.api.deps import IdempotencyKey, LiveDep, once, replay_headers
from service.api.errors import ApiError
from service.http import FastJSONResponse, errors
from service.schemas import EventRequest, EventResponse

router = APIRouter(tags=["events"])


@router.post("/events", response_model=EventResponse, responses=errors(400, 404, 408, 413, 422, 503))
async def record_event(body: EventRequest, live: LiveDep, request: Request, idempotency_key: IdempotencyKey = None):
    """Validated, joined to its impression when it names a request, durably recorded, then acknowledged. Recording waits on I/O (an fsync, or Redis's under
    its own fsync policy), not on the CPU: it runs on its own pool of ``io_threads``, so that many events
    are in flight at once (Redis commits concurrent writes together) while the CPU-bound recommendations
    keep their few threads and no GIL convoy."""
    low, high = live.engine.rating_scale
    if body.rating is not None and not low <= body.rating <= high:
        raise ApiError(422, f"rating {body.rating} is outside the bundle's rating scale [{low:g}, {high:g}]")
    types = request.app.state.settings.type_list
    if body.type is not None and body.type not in types:
        raise ApiError(422, f"type {body.type!r} is not one of {types} (RECSYS_FEEDBACK_TYPES)")
    if body.position is not None and body.request_id is None:
        raise ApiError(422, "position needs the request_id of the answer it refers to")
    if None not in (body.event_id, idempotency_key) and body.event_id != idempotency_key:
        raise ApiError(422, "event_id and the Idempotency-Key header differ: send one, or the same value in both")
    key = once(body.event_id or idempotency_key, body.model_dump(mode="json", exclude={"event_id"}))
    event = Event(str(body.item_id), None if body.rating is None else float(body.rating),
                  body.timestamp if body.timestamp is not None else int(time.time()), body.type, body.request_id, body.position)
    done = await anyio.to_thread.run_sync(live.record_event, str(body.user_id), event, key,
                                          limiter=request.app.state.io_limiter)
    if not done.replayed:
        metrics.EVENTS.inc()  # counted once recorded
    out = {"status": "recorded", "user_id": str(body.user_id), "history_length": done.history_length}
    if done.joined is not None:
        out.update(joined=done.joined.position is not None, position=done.joined.position, reason=done.joined.reason)
    return FastJSONResponse(out, headers=replay_headers(done.replayed))
