"""HTTP plumbing shared by every route: the error shape, JSON rendering, and the two ASGI middlewares.

The middlewares are plain ASGI rather than ``@app.middleware("http")``: Starlette's
BaseHTTPMiddleware costs a task and a stream per request, a measurable share of a ~1 ms request.
"""
from __future__ import annotations

import itertools
import os
import re
import time
import uuid
from typing import Any

import anyio
import orjson
from fastapi import HTTPException
from fastapi.responses import JSONResponse
from loguru import logger
from starlette.routing import Match
from starlette.staticfiles import StaticFiles

from service import metrics, tracing
from service.config import get_settings
from service.schemas import ErrorBody

ERROR_DESCRIPTIONS = {
    400: "malformed JSON body",
    401: "missing or wrong bearer token (with `WWW-Authenticate: Bearer`)",
    403: "admin endpoints are disabled (RECSYS_ADMIN_TOKEN is not set)",
    404: "unknown user or item id",
    408: "the request body stalled (RECSYS_BODY_TIMEOUT_S)",
    409: "the bundle could not be loaded; the old one keeps serving",
    413: "request body larger than RECSYS_MAX_BODY_BYTES",
    422: "a field is missing, of the wrong type or out of range; `details` names each",
    503: "not ready, or the state store cannot be reached (retry; a write retried with its Idempotency-Key is recorded once)",
}
# pydantic's union-branch and validator tags in an error location: noise to a client
_LOC_TAG = re.compile(r"^(function-\w+\[.*\]|constrained-\w+|str|int|float|bool|list\[.*\]|dict\[.*\])$")


class FastJSONResponse(JSONResponse):
    """orjson rendering: several times faster than the standard library for our payloads."""

    def render(self, content: Any) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


def error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The one error body shape: ``{"error": message}``."""
    return FastJSONResponse({"error": message}, status_code=status, headers=headers)


def errors(*codes: int) -> dict[int, dict]:
    """OpenAPI ``responses`` for these error statuses, all with the one error body."""
    return {c: {"model": ErrorBody, "description": ERROR_DESCRIPTIONS[c]} for c in codes}


def validation_summary(problems: list[dict]) -> tuple[str, list[dict]]:
    """``field.path: message`` per field (one line for all the branches of a union), and the details."""
    by_field: dict[str, list[str]] = {}
    for p in problems:
        path = ".".join(str(part) for part in p["loc"] if not (isinstance(part, str) and _LOC_TAG.match(part)))
        messages = by_field.setdefault(path or "body", [])
        if p["msg"] not in messages:
            messages.append(p["msg"])
    summary = "; ".join(f"{path}: {' or '.join(msgs)}" for path, msgs in by_field.items())
    return summary, [{"loc": path.split("."), "msg": " or ".join(msgs)} for path, msgs in by_field.items()]


def allowed_methods(app, scope: dict) -> list[str]:
    """Every method some route answers on this path (a path match is at least partial whatever the method); a
    mount of static files (the web page's) answers GET and HEAD."""
    methods: set[str] = set()
    scope = {**scope, "root_path": scope.get("app_root_path", scope.get("root_path", ""))}  # (inside a mount: the app's)
    for route in app.router.routes:
        if route.matches(scope)[0] == Match.NONE:
            continue
        if getattr(route, "methods", None):
            methods |= route.methods
        elif isinstance(getattr(route, "app", None), StaticFiles):
            methods |= {"GET", "HEAD"}
    return sorted(methods)


class BodyLimit:
    """413 for a body over ``max_body_bytes``, counted as it streams in (a chunked request carries no
    content-length for ``Observe`` to check, and must not be read whole first); 408 for a body that
    stalls longer than ``body_timeout_s`` between chunks, so a slow client cannot hold a worker thread."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        settings = get_settings()
        limit, timeout, received = settings.max_body_bytes, settings.body_timeout_s, 0

        async def limited_receive():
            nonlocal received
            try:
                with anyio.fail_after(timeout):
                    message = await receive()
            except TimeoutError:  # FastAPI re-raises an HTTPException from the body read as is
                raise HTTPException(408, f"request body not received within {timeout:g} s") from None
            received += len(message.get("body", b""))
            if received > limit:
                raise HTTPException(413, f"request body larger than {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


REQUEST_ID = "recsys.request_id"  # the scope key holding the request's id


class Observe:
    """Request id, content-length limit, in-flight gauge, per-endpoint counts and latency, the log of an unhandled
    error; with tracing on, the request's server span (``service/tracing.py``), its trace and span ids in every log
    line of the request next to the request id."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        request_id = _request_id(headers.get(b"x-request-id", b""))
        scope[REQUEST_ID] = request_id  # (for the 500 answered outside this middleware: ``service.api.errors``)
        start, status = time.perf_counter(), 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode())]
            await send(message)

        metrics.IN_FLIGHT.inc()
        span = None if tracing.TRACER is None else tracing.RequestSpan(tracing.TRACER, scope)
        failure = None
        try:
            with logger.contextualize(request_id=request_id, **(span.log_ids() if span is not None else {})):
                try:
                    await self._answer(scope, receive, send_with_id, headers.get(b"content-length"))
                except Exception as err:  # logged here, with the request's ids: the outermost middleware answers
                    failure = err         # it 500, outside this one
                    logger.opt(exception=err).error("unhandled error")
                    raise
        finally:
            metrics.IN_FLIGHT.dec()
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            metrics.REQUESTS.labels(endpoint, scope["method"], str(status)).inc()
            metrics.LATENCY.labels(endpoint).observe(time.perf_counter() - start)
            if span is not None:
                span.end(scope, status, failure)

    async def _answer(self, scope, receive, send, length: bytes | None) -> None:
        """A 413 at once for a declared length over the limit (the body is never read), else the app's answer."""
        limit = get_settings().max_body_bytes
        if length is not None and (not length.isdigit() or int(length) > limit):
            await error(413, f"request body larger than {limit} bytes")(scope, receive, send)
        else:
            await self.app(scope, receive, send)


_IDS = itertools.count(1)
_ID_PREFIX = f"{os.getpid():x}-{uuid.uuid4().hex[:6]}"


def _request_id(given: bytes) -> str:
    """The client's id when it is short printable ASCII (it is echoed in a header and the logs), else a new
    one: process, start and a counter, unique without a uuid4 per request (a measurable share of ~1 ms)."""
    text = given.decode("latin-1")[:64]
    return text if text and text.isascii() and text.isprintable() else f"{_ID_PREFIX}-{next(_IDS):x}"
