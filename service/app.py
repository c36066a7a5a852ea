"""FastAPI app: thin routes over the engine. Start with ``uvicorn service.app:app``.

Handlers that do CPU work are plain ``def`` so FastAPI runs them in its thread pool and the
event loop stays free; the loaded engine is handed to routes as a dependency.
"""
from __future__ import annotations

import hmac
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import anyio
import hnswlib  # noqa: F401  (imported early: fail at boot, not on the first request, if missing)
import torch
from threadpoolctl import threadpool_limits
import orjson
from fastapi import Depends, FastAPI, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from offline.bundle import BundleError, read_bundle
from service import metrics
from service.config import Settings, get_settings
from service.engine import Engine, RequestError, now
from service.schemas import EventRequest, Filters, ItemUpsert, RecommendRequest, ReloadRequest
from service.store import DurableLog


class ServiceState:
    """The current engine plus the durable logs; ``write_lock`` orders writes against reloads."""

    def __init__(self, settings: Settings):
        self.settings = settings
        state_dir = settings.resolved_state_dir
        self.events = DurableLog(state_dir / "events.jsonl")
        self.catalog_log = DurableLog(state_dir / "catalog.jsonl")
        self.write_lock = threading.RLock()
        self.engine: Engine | None = None
        self.install(self.build(settings.bundle_dir))

    def build(self, path: Path) -> Engine:
        """Read and validate a bundle into a new engine, beside whatever is serving. Any failure is a
        ``BundleError`` (a ranker state the code cannot load, a feature spec with wrong fields, ...),
        so start-up refuses with a message and a reload answers 409, never 500."""
        bundle = read_bundle(path, index_threads=self.settings.index_threads)
        try:
            return Engine.from_bundle(bundle, self.settings.user_vector_cache)
        except Exception as err:
            raise BundleError(f"{bundle.path}: cannot serve this bundle ({type(err).__name__}: {err})") from err

    def install(self, engine: Engine) -> None:
        """Replay the logs onto ``engine`` and make it the live one, under ``write_lock`` so that
        no acknowledged write lands on the old engine after the replay read the logs."""
        with self.write_lock:
            replay(engine, self.catalog_log.read(), self.events.read())
            self.engine = engine
        metrics.set_bundle(engine.version, engine.searchable_items)


def replay(engine: Engine, catalog_records: list[dict], event_records: list[dict]) -> None:
    """Re-apply acknowledged catalogue changes, then events; records that no longer apply are logged."""
    for rec in catalog_records:
        try:
            if rec["op"] == "upsert":
                engine.upsert_item(ItemUpsert(**rec["item"]))
            else:
                engine.remove_item(rec["item_id"])
        except (RequestError, ValidationError, KeyError, TypeError) as err:
            logger.warning("catalogue replay: {} ({})", getattr(err, "message", err), rec)
    for rec in event_records:
        try:
            engine.apply_event(rec["user_id"], rec["item_id"], rec.get("rating"), rec["timestamp"], replay=True)
        except (RequestError, KeyError, TypeError) as err:
            logger.warning("event replay: {} ({})", getattr(err, "message", err), rec)


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = get_settings()
    logger.remove()
    logger.add(sys.stderr, level=settings.log_level, serialize=True)
    torch.set_num_threads(settings.torch_threads)
    # Requests already run in parallel on the thread pool; BLAS threads per call would only
    # oversubscribe the cores (measured: 8 ms instead of 0.6 ms for the ranker's matmuls).
    threadpool_limits(settings.torch_threads, user_api="blas")
    anyio.to_thread.current_default_thread_limiter().total_tokens = settings.worker_threads
    try:
        state = ServiceState(settings)
    except (BundleError, OSError) as err:  # OSError: the state directory cannot be created or written
        logger.error("cannot start: {}", err)
        raise RuntimeError(f"cannot start: {err}") from err
    app.state.service = state
    logger.info("serving bundle {} ({} items)", state.engine.version, state.engine.searchable_items)
    yield
    state.events.close()
    state.catalog_log.close()


class FastJSONResponse(JSONResponse):
    """orjson rendering: several times faster than the standard library for our payloads."""

    def render(self, content) -> bytes:
        return orjson.dumps(content, option=orjson.OPT_SERIALIZE_NUMPY)


app = FastAPI(title="recsys", default_response_class=FastJSONResponse, lifespan=lifespan)


class BodyLimit:
    """413 for a body over ``max_body_bytes``, counted as it streams in: a chunked request carries no
    content-length for the ``observe`` middleware to check, and must not be read whole first."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit, received = get_settings().max_body_bytes, 0

        async def limited_receive():
            nonlocal received
            message = await receive()
            received += len(message.get("body", b""))
            if received > limit:  # FastAPI re-raises an HTTPException from the body read as is
                raise HTTPException(413, f"request body larger than {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


app.add_middleware(BodyLimit)  # added first, so it runs inside ``observe`` and its 413s are counted


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def get_engine(request: Request) -> Engine:
    return request.app.state.service.engine


def require_admin(state: Annotated[ServiceState, Depends(get_state)], authorization: Annotated[str | None, Header()] = None):
    token = state.settings.admin_token
    if token is None:
        raise RequestError(403, "admin endpoints are disabled: set RECSYS_ADMIN_TOKEN to enable them")
    if not hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode()):  # constant time
        raise RequestError(401, "missing or wrong bearer token")


EngineDep = Annotated[Engine, Depends(get_engine)]
StateDep = Annotated[ServiceState, Depends(get_state)]


class Observe:
    """Request id, content-length limit, in-flight gauge, per-endpoint counts and latency.

    Plain ASGI rather than ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware costs a
    task and a stream per request, a measurable share of a ~1 ms request.
    """

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        request_id = headers.get(b"x-request-id", b"").decode("latin-1")[:64] or uuid.uuid4().hex[:16]
        start, status = time.perf_counter(), 500

        async def send_with_id(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", request_id.encode("latin-1"))]
            await send(message)

        metrics.IN_FLIGHT.inc()
        try:
            with logger.contextualize(request_id=request_id):
                length, limit = headers.get(b"content-length"), get_settings().max_body_bytes
                if length is not None and (not length.isdigit() or int(length) > limit):
                    await error(413, f"request body larger than {limit} bytes")(scope, receive, send_with_id)
                else:
                    await self.app(scope, receive, send_with_id)
        finally:
            metrics.IN_FLIGHT.dec()
            endpoint = getattr(scope.get("route"), "path", "unmatched")
            metrics.REQUESTS.labels(endpoint, scope["method"], str(status)).inc()
            metrics.LATENCY.labels(endpoint).observe(time.perf_counter() - start)


app.add_middleware(Observe)


def error(status: int, message: str) -> JSONResponse:
    """The one error body shape: ``{"error": message}``."""
    return FastJSONResponse({"error": message}, status_code=status)


@app.exception_handler(RequestError)
async def request_error(_: Request, err: RequestError):
    return error(err.status, err.message)


@app.exception_handler(RequestValidationError)
async def validation_error(_: Request, err: RequestValidationError):
    details = [{"loc": list(e["loc"]), "msg": e["msg"]} for e in err.errors()]
    summary = "; ".join(f"{'.'.join(map(str, d['loc']))}: {d['msg']}" for d in details)
    return FastJSONResponse({"error": f"invalid request: {summary}", "details": details}, status_code=422)


@app.exception_handler(ValidationError)
async def model_validation_error(_: Request, err: ValidationError):
    """A model built inside a handler (``GET /recommend`` builds its request) fails like a body would."""
    summary = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors())
    return error(422, f"invalid request: {summary}")


@app.exception_handler(StarletteHTTPException)
async def http_error(_: Request, err: StarletteHTTPException):
    """Framework errors (unknown route, wrong method, oversized body) in the one error shape."""
    return error(err.status_code, str(err.detail))


@app.exception_handler(Exception)
async def unexpected(_: Request, err: Exception):
    logger.exception("unhandled error")
    return error(500, f"internal error ({type(err).__name__}); see logs")


@app.get("/health")
def health():
    return {"status": "alive"}


@app.get("/ready")
def ready(request: Request):
    state = getattr(request.app.state, "service", None)
    if state is None:
        return error(503, "bundle not loaded")
    return {"status": "ready", "bundle_version": state.engine.version, "items": state.engine.searchable_items}


@app.get("/metrics")
def prometheus_metrics():
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


@app.get("/recommend")
def recommend_get(engine: EngineDep, user_id: Annotated[str, Query(min_length=1)],
                  k: Annotated[int, Query(ge=1)] = 10, candidates: Annotated[int | None, Query(ge=1)] = None,
                  exclude_seen: bool = True, explain: bool = False,
                  genres_any: Annotated[list[str] | None, Query()] = None,
                  genres_none: Annotated[list[str] | None, Query()] = None,
                  year_min: int | None = None, year_max: int | None = None):
    """The POST pipeline for a known user; filters as repeated query parameters (``genres_any=a&genres_any=b``)."""
    filters = None
    if genres_any or genres_none or year_min is not None or year_max is not None:
        filters = Filters(genres_any=genres_any, genres_none=genres_none, year_min=year_min, year_max=year_max)
    return recommend_post(RecommendRequest(user_id=user_id, k=k, candidates=candidates, exclude_seen=exclude_seen,
                                           filters=filters, explain=explain), engine)


@app.post("/recommend")
def recommend_post(body: RecommendRequest, engine: EngineDep):
    settings = get_settings()
    if body.k > settings.max_k:
        raise RequestError(422, f"k must be <= {settings.max_k}")
    if body.candidates is not None and body.candidates > settings.max_candidates:
        raise RequestError(422, f"candidates must be <= {settings.max_candidates}")
    if body.recent_items is not None and len(body.recent_items) > settings.max_recent_items:
        raise RequestError(422, f"recent_items may hold at most {settings.max_recent_items} ids")
    return engine.recommend(body, settings.default_candidates)


@app.get("/similar-items/{item_id}")
def similar_items(item_id: str, engine: EngineDep, k: Annotated[int, Query(ge=1)] = 10):
    if k > get_settings().max_k:
        raise RequestError(422, f"k must be <= {get_settings().max_k}")
    return engine.similar_items(item_id, k)


@app.post("/events")
def record_event(body: EventRequest, state: StateDep):
    """Validated, fsynced to the event log, then applied: acknowledged means durable."""
    record = {"user_id": str(body.user_id), "item_id": str(body.item_id), "rating": body.rating,
              "timestamp": body.timestamp if body.timestamp is not None else now()}
    with state.write_lock:
        engine = state.engine
        engine.require_item(record["item_id"])
        state.events.append(record)
        length = engine.apply_event(record["user_id"], record["item_id"], record["rating"], record["timestamp"])
    metrics.EVENTS.inc()
    return {"status": "recorded", "user_id": record["user_id"], "history_length": length}


@app.put("/admin/items", dependencies=[Depends(require_admin)])
@app.post("/admin/items", dependencies=[Depends(require_admin)])
def upsert_item(body: ItemUpsert, state: StateDep):
    """Validated and encoded, fsynced to the catalogue log, then made live: acknowledged means durable."""
    with state.write_lock:
        change = state.engine.prepare_upsert(body)
        state.catalog_log.append({"op": "upsert", "item": body.model_dump()})
        result = state.engine.commit_upsert(change)
    metrics.INDEX_ITEMS.set(state.engine.searchable_items)
    return result


@app.delete("/admin/items/{item_id}", dependencies=[Depends(require_admin)])
def remove_item(item_id: str, state: StateDep):
    with state.write_lock:
        state.engine.require_item(item_id)  # a 404 is not logged
        state.catalog_log.append({"op": "remove", "item_id": item_id})
        result = state.engine.remove_item(item_id)
    metrics.INDEX_ITEMS.set(state.engine.searchable_items)
    return result


@app.post("/admin/reload", dependencies=[Depends(require_admin)])
def reload_bundle(state: StateDep, body: ReloadRequest | None = None):
    """Load a bundle beside the live one and swap it in; on failure the old one keeps serving."""
    path = state.settings.bundle_dir / body.version if body and body.version else state.settings.bundle_dir
    if body and body.version and ("/" in body.version or body.version.startswith(".")):
        raise RequestError(422, "version must be a directory name under the bundle root")
    old = state.engine.version
    try:
        engine = state.build(path)
    except BundleError as err:
        logger.warning("reload failed, keeping {}: {}", old, err)
        raise RequestError(409, f"reload failed, still serving {old}: {err}") from err
    state.install(engine)
    logger.info("reloaded: {} -> {}", old, engine.version)
    return {"status": "reloaded", "previous_version": old, "bundle_version": engine.version}
