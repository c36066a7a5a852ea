"""Interactions: ``POST /events``."""
from __future__ import annotations

import time

import anyio
from fastapi import APIRouter, Request

from recsys.state.protocol import Event
from service import metrics
from service.api.deps import LiveDep
from service.api.errors import ApiError
from service.http import FastJSONResponse, errors
from service.schemas import EventRequest, EventResponse

router = APIRouter(tags=["events"])


@router.post("/events", response_model=EventResponse, responses=errors(400, 404, 408, 413, 422, 503))
async def record_event(body: EventRequest, live: LiveDep, request: Request):
    """Validated, durably recorded, then acknowledged. Recording waits on I/O (an fsync, or Redis's under
    its own fsync policy), not on the CPU: it runs on its own pool of ``io_threads``, so that many events
    are in flight at once (Redis commits concurrent writes together) while the CPU-bound recommendations
    keep their few threads and no GIL convoy."""
    low, high = live.engine.rating_scale
    if body.rating is not None and not low <= body.rating <= high:
        raise ApiError(422, f"rating {body.rating} is outside the bundle's rating scale [{low:g}, {high:g}]")
    event = Event(str(body.item_id), None if body.rating is None else float(body.rating),
                  body.timestamp if body.timestamp is not None else int(time.time()))
    length = await anyio.to_thread.run_sync(live.record_event, str(body.user_id), event, limiter=request.app.state.io_limiter)
    metrics.EVENTS.inc()  # counted once recorded
    return FastJSONResponse({"status": "recorded", "user_id": str(body.user_id), "history_length": length})
