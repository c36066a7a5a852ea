"""FastAPI app: thin routes over the engine. Start with ``uvicorn service.app:app``.

Handlers that do CPU work are plain ``def`` so FastAPI runs them in its thread pool and the
event loop stays free; the loaded engine is handed to routes as a dependency. Routes return
their JSON already rendered (orjson): the response model documents the body in the OpenAPI
document, and the schemathesis test in CI checks that what is served matches it.
"""
from __future__ import annotations

import hmac
import os
import sys
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated

import anyio
import hnswlib  # noqa: F401  (imported early: fail at boot, not on the first request, if missing)
import torch
from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import FileResponse, PlainTextResponse
from fastapi.staticfiles import StaticFiles
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from loguru import logger
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from threadpoolctl import threadpool_limits

from offline.bundle import BundleError
from service import metrics
from service.config import Settings, get_settings
from service.engine import Engine, RequestError, now
from service.http import BodyLimit, FastJSONResponse, Observe, allowed_methods, error, errors, validation_summary
from service.schemas import (
    MAX_ID_CHARS, YEAR_RANGE, BatchRecommendRequest, BatchRecommendResponse, BundleInfo, EventRequest, EventResponse,
    Filters, HealthResponse, ItemChangeResponse, ItemUpsert, ReadyResponse, RecommendOptions, RecommendRequest,
    RecommendResponse, ReloadRequest, ReloadResponse, SimilarItemsResponse,
)
from service.state import ServiceState
from service.store import Event, StoreUnavailable


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = get_settings()
    logger.remove()
    # diagnose=False: a traceback's local variables can hold request bodies and secrets
    logger.add(sys.stderr, level=settings.log_level, serialize=True, diagnose=settings.log_diagnose, backtrace=False)
    torch.set_num_threads(settings.torch_threads)
    # Requests already run in parallel on the thread pool; BLAS threads per call would only
    # oversubscribe the cores (measured: 8 ms instead of 0.6 ms for the ranker's matmuls).
    threadpool_limits(settings.torch_threads, user_api="blas")
    anyio.to_thread.current_default_thread_limiter().total_tokens = settings.worker_threads
    try:
        state = ServiceState(settings)
    except (BundleError, OSError, StoreUnavailable) as err:  # OSError: the state directory cannot be created or written
        logger.error("cannot start: {}", err)
        raise RuntimeError(f"cannot start: {err}") from err
    app.state.service = state
    app.openapi_schema = None  # regenerated with these settings' limits on the next request
    logger.info("serving bundle {} ({} items)", state.engine.version, state.engine.searchable_items)
    yield
    state.close()
    metrics.worker_exited(os.getpid())


app = FastAPI(title="recsys", version="0.2.0", default_response_class=FastJSONResponse, lifespan=lifespan,
              description="Two-stage recommendations: two-tower recall over an HNSW index, then a LambdaRank re-ranker. "
                          "Every error answers `{\"error\": message}`.")
app.add_middleware(BodyLimit)  # added first, so it runs inside ``Observe`` and its 413s / 408s are counted
app.add_middleware(Observe)
STATIC = Path(__file__).parent / "static"
bearer = HTTPBearer(auto_error=False, description="RECSYS_ADMIN_TOKEN; admin routes answer 403 when it is not set")


def get_state(request: Request) -> ServiceState:
    return request.app.state.service


def get_engine(request: Request) -> Engine:
    return request.app.state.service.engine


def require_admin(state: Annotated[ServiceState, Depends(get_state)],
                  credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """The scheme name is matched case-insensitively (RFC 7235); the token in constant time."""
    token = state.settings.admin_token
    if token is None:
        raise RequestError(403, "admin endpoints are disabled: set RECSYS_ADMIN_TOKEN to enable them")
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, token.get_secret_value().encode()):
        raise RequestError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


EngineDep = Annotated[Engine, Depends(get_engine)]
StateDep = Annotated[ServiceState, Depends(get_state)]
ADMIN = dict(dependencies=[Depends(require_admin)], tags=["admin"])


# ----------------------------------------------------------------------------- errors
@app.exception_handler(RequestError)
async def request_error(_: Request, err: RequestError):
    return error(err.status, err.message, err.headers)


@app.exception_handler(StoreUnavailable)
async def store_unavailable(_: Request, err: StoreUnavailable):
    """Nothing was recorded; the client may retry. Reads keep serving from the bundle meanwhile."""
    logger.warning("state store unavailable: {}", err)
    return error(503, f"state store unavailable, nothing was recorded: {err}", {"Retry-After": "1"})


@app.exception_handler(RequestValidationError)
async def validation_error(_: Request, err: RequestValidationError):
    """A body that is not JSON at all is a 400; JSON with wrong fields is a 422 naming each field."""
    if any(e["type"] == "json_invalid" for e in err.errors()):
        return error(400, "malformed JSON body")
    summary, details = validation_summary(err.errors())
    return FastJSONResponse({"error": f"invalid request: {summary}", "details": details}, status_code=422)


@app.exception_handler(ValidationError)
async def model_validation_error(_: Request, err: ValidationError):
    """A model built inside a handler (``GET /recommend`` builds its request) fails like a body would."""
    summary, details = validation_summary(err.errors())
    return FastJSONResponse({"error": f"invalid request: {summary}", "details": details}, status_code=422)


@app.exception_handler(StarletteHTTPException)
async def http_error(request: Request, err: StarletteHTTPException):
    """Framework errors (unknown route, wrong method, oversized body) in the one error shape; a 405
    names every method the path answers (Starlette would name only the first route's)."""
    headers = dict(err.headers or {})
    if err.status_code == 405:
        headers["Allow"] = ", ".join(allowed_methods(request.app, request.scope))
    return error(err.status_code, str(err.detail), headers)


@app.exception_handler(Exception)
async def unexpected(_: Request, err: Exception):
    logger.opt(exception=err).error("unhandled error")
    return error(500, f"internal error ({type(err).__name__}); see logs")


# ----------------------------------------------------------------------------- probes and metrics
@app.get("/health", response_model=HealthResponse, tags=["probes"])
def health():
    return FastJSONResponse({"status": "alive"})


@app.get("/ready", response_model=ReadyResponse, responses=errors(503), tags=["probes"])
def ready(request: Request):
    """Ready once a bundle is loaded. With the state store unreachable the replica still serves reads from
    the bundle (writes get 503), so it stays in the load balancer and says ``degraded`` and why."""
    state = getattr(request.app.state, "service", None)
    if state is None:
        return error(503, "bundle not loaded")
    engine, problem = state.engine, state.health()
    return FastJSONResponse({"status": "degraded" if problem else "ready", "state_store": problem or "ok",
                             "bundle_version": engine.version, "items": engine.searchable_items,
                             "rating_scale": dict(zip(("min", "max"), engine.rating_scale))})


@app.get("/metrics", response_class=PlainTextResponse, tags=["probes"],
         responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "Prometheus text format"}})
def prometheus_metrics():
    return PlainTextResponse(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)


# ----------------------------------------------------------------------------- recommendations
@app.get("/recommend", response_model=RecommendResponse, responses=errors(404, 422), tags=["recommend"])
def recommend_get(engine: EngineDep, user_id: Annotated[str, Query(min_length=1, max_length=MAX_ID_CHARS)],
                  k: Annotated[int, Query(ge=1, le=10_000)] = 10,
                  candidates: Annotated[int | None, Query(ge=1, le=100_000)] = None,
                  exclude_seen: bool = True, explain: bool = False,
                  genres_any: Annotated[list[str] | None, Query(max_length=100)] = None,
                  genres_none: Annotated[list[str] | None, Query(max_length=100)] = None,
                  year_min: Annotated[int | None, Query(ge=YEAR_RANGE[0], le=YEAR_RANGE[1])] = None,
                  year_max: Annotated[int | None, Query(ge=YEAR_RANGE[0], le=YEAR_RANGE[1])] = None):
    """The POST pipeline for a known user; filters as repeated query parameters (``genres_any=a&genres_any=b``)."""
    filters = None
    if genres_any or genres_none or year_min is not None or year_max is not None:
        filters = Filters(genres_any=genres_any, genres_none=genres_none, year_min=year_min, year_max=year_max)
    return recommend_post(RecommendRequest(user_id=user_id, k=k, candidates=candidates, exclude_seen=exclude_seen,
                                           filters=filters, explain=explain), engine)


@app.post("/recommend", response_model=RecommendResponse, responses=errors(400, 404, 408, 413, 422), tags=["recommend"])
def recommend_post(body: RecommendRequest, engine: EngineDep):
    settings = get_settings()
    check_options(body, settings)
    if body.recent_items is not None and len(body.recent_items) > settings.max_recent_items:
        raise RequestError(422, f"recent_items may hold at most {settings.max_recent_items} ids")
    return FastJSONResponse(engine.recommend(body, settings.default_candidates))


@app.post("/recommend/batch", response_model=BatchRecommendResponse, responses=errors(400, 408, 413, 422), tags=["recommend"])
def recommend_batch(body: BatchRecommendRequest, engine: EngineDep):
    """Known users by id, answered together: one tower call, one batched ANN query, one ranker pass. Each result
    is what ``/recommend`` would answer for that user with these options; a user it would refuse (an unknown
    id: 404) gets that error and status in its place, and the rest of the batch is still answered."""
    settings = get_settings()
    check_options(body, settings)
    if len(body.user_ids) > settings.max_batch_users:
        raise RequestError(422, f"user_ids may hold at most {settings.max_batch_users} ids (RECSYS_MAX_BATCH_USERS)")
    answer = engine.recommend_batch(body.user_ids, body, settings.default_candidates, metrics.BATCH_STAGE)
    failed = sum(result.get("error") is not None for result in answer["results"])
    metrics.BATCH_USERS.labels("answered").inc(len(answer["results"]) - failed)
    metrics.BATCH_USERS.labels("error").inc(failed)
    return FastJSONResponse(answer)


def check_options(body: RecommendOptions, settings: Settings) -> None:
    if body.k > settings.max_k:
        raise RequestError(422, f"k must be <= {settings.max_k}")
    if body.candidates is not None and body.candidates > settings.max_candidates:
        raise RequestError(422, f"candidates must be <= {settings.max_candidates}")


@app.get("/similar-items/{item_id:path}", response_model=SimilarItemsResponse, responses=errors(404, 422), tags=["recommend"])
def similar_items(item_id: str, engine: EngineDep, k: Annotated[int, Query(ge=1, le=10_000)] = 10):
    """Item ids may contain ``/`` (the path takes the rest of the URL), as the catalogue accepts them."""
    if k > get_settings().max_k:
        raise RequestError(422, f"k must be <= {get_settings().max_k}")
    return FastJSONResponse(engine.similar_items(item_id, k))


@app.get("/info", response_model=BundleInfo, tags=["recommend"])
def info(state: StateDep):
    """What this replica serves: the bundle, its catalogue's genres and years, a few known users (the web page's
    form is built from it)."""
    return FastJSONResponse(state.engine.info())


# ----------------------------------------------------------------------------- web page
@app.get("/", include_in_schema=False)
def page():
    """The web page (service/static): no build step, it calls the JSON routes above."""
    return FileResponse(STATIC / "index.html", media_type="text/html")


app.mount("/static", StaticFiles(directory=STATIC), name="static")


# ----------------------------------------------------------------------------- online state
@app.post("/events", response_model=EventResponse, responses=errors(400, 404, 408, 413, 422, 503), tags=["events"])
async def record_event(body: EventRequest, state: StateDep):
    """Validated, durably recorded, then acknowledged. Recording waits on I/O (an fsync, or Redis's under
    its own fsync policy), not on the CPU: it runs on its own pool of ``io_threads``, so that many events
    are in flight at once (Redis commits concurrent writes together) while the CPU-bound recommendations
    keep their few threads and no GIL convoy."""
    low, high = state.engine.rating_scale
    if body.rating is not None and not low <= body.rating <= high:
        raise RequestError(422, f"rating {body.rating} is outside the bundle's rating scale [{low:g}, {high:g}]")
    event = Event(str(body.item_id), None if body.rating is None else float(body.rating),
                  body.timestamp if body.timestamp is not None else now())
    length = await anyio.to_thread.run_sync(state.record_event, str(body.user_id), event, limiter=state.io_limiter)
    metrics.EVENTS.inc()  # counted once recorded
    return FastJSONResponse({"status": "recorded", "user_id": str(body.user_id), "history_length": length})


@app.api_route("/admin/items", methods=["PUT", "POST"], response_model=ItemChangeResponse,
               responses=errors(400, 401, 403, 408, 413, 422, 503), **ADMIN)
def upsert_item(body: ItemUpsert, state: StateDep):
    """Add an item or replace one (same id): item tower for its vector, then live in the index.
    Validated and encoded first, fsynced to the catalogue log, then made live: acknowledged means durable."""
    return FastJSONResponse(state.upsert_items([body]))


@app.delete("/admin/items/{item_id:path}", response_model=ItemChangeResponse, responses=errors(401, 403, 404, 422, 503),
            **ADMIN)
def remove_item(item_id: str, state: StateDep):
    return FastJSONResponse(state.remove_item(item_id))


@app.post("/admin/reload", response_model=ReloadResponse, responses=errors(400, 401, 403, 408, 409, 413, 422, 503),
          **ADMIN)
def reload_bundle(state: StateDep, body: ReloadRequest | None = None):
    """Load a bundle beside the live one and swap it in; on any failure (409) the old one keeps serving."""
    path = state.settings.bundle_dir / body.version if body and body.version else state.settings.bundle_dir
    try:
        old, new = state.reload(path)
    except (BundleError, OSError) as err:
        raise RequestError(409, f"reload failed, still serving {state.engine.version}: {err}") from err
    return FastJSONResponse({"status": "reloaded", "previous_version": old, "bundle_version": new})



# ----------------------------------------------------------------------------- OpenAPI
def openapi() -> dict:
    """The generated document with this deployment's limits (``max_k``...) in place of the schemas' hard
    ceilings, so that a client, and the fuzz test in CI, knows what the service really accepts."""
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        apply_limits(schema, get_settings())
        app.openapi_schema = schema
    return app.openapi_schema


def apply_limits(schema: dict, settings: Settings) -> None:
    def limit(node: dict, key: str, value: int) -> None:
        for branch in node.get("anyOf", [node]):  # ``int | None`` is an anyOf with a null branch
            if branch.get("type") in ("integer", "array"):
                branch[key] = value

    for name in ("RecommendRequest", "BatchRecommendRequest"):
        body = schema["components"]["schemas"][name]["properties"]
        limit(body["k"], "maximum", settings.max_k)
        limit(body["candidates"], "maximum", settings.max_candidates)
    limit(schema["components"]["schemas"]["RecommendRequest"]["properties"]["recent_items"], "maxItems",
          settings.max_recent_items)
    limit(schema["components"]["schemas"]["BatchRecommendRequest"]["properties"]["user_ids"], "maxItems",
          settings.max_batch_users)
    for path in ("/recommend", "/similar-items/{item_id}"):
        for param in schema["paths"][path]["get"]["parameters"]:
            if param["name"] in ("k", "candidates"):
                limit(param["schema"], "maximum", settings.max_k if param["name"] == "k" else settings.max_candidates)


app.openapi = openapi
