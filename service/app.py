"""The FastAPI app: the factory assembles middleware, error handlers, routers and the OpenAPI document;
the lifespan loads the live engine. Start with ``uvicorn service.app:app``.

``/recommend`` answers on the event loop: it awaits the user's history from the store, then computes its
answer (under a millisecond) without a thread hand-off, which cost more CPU than it saved (the loop and the
worker traded the GIL). Handlers with longer CPU work (batches, similar items, admin writes) are plain ``def``,
run in FastAPI's thread pool so that the loop stays free; the loaded engine is handed to routes as a dependency
(``service/api/deps.py``). Routes return their JSON already rendered (orjson): the response model documents the
body in the OpenAPI document, and the schemathesis test in CI checks that what is served matches it.
"""
from __future__ import annotations

import logging
import os
import sys
from contextlib import asynccontextmanager

import anyio
import hnswlib  # noqa: F401  (imported early: fail at boot, not on the first request, if missing)
import torch
from fastapi import APIRouter, FastAPI
from fastapi.staticfiles import StaticFiles
from loguru import logger
from threadpoolctl import threadpool_limits

from recsys.bundle import BundleError
from recsys.live import LiveEngine
from recsys.state.protocol import StoreUnavailable
from service import metrics, tracing
from service.api import errors, openapi
from service.api.routes import admin, events, experiments, page, probes, recommend
from service.config import get_settings
from service.http import BodyLimit, FastJSONResponse, Observe


@asynccontextmanager
async def lifespan(app: FastAPI):
    settings = get_settings()
    logger.remove()
    # diagnose=False: a traceback's local variables can hold request bodies and secrets
    logger.add(sys.stderr, level=settings.log_level, serialize=True, diagnose=settings.log_diagnose, backtrace=False)
    if not settings.access_log:  # uvicorn writes an access line per request only while this logger has handlers
        access = logging.getLogger("uvicorn.access")
        access.handlers, access.propagate = [], False
    torch.set_num_threads(settings.torch_threads)
    # Workers (and the thread pool's routes) already share the cores; BLAS threads per call would only
    # oversubscribe them (measured: 8 ms instead of 0.6 ms for the ranker's matmuls).
    threadpool_limits(settings.torch_threads, user_api="blas")
    anyio.to_thread.current_default_thread_limiter().total_tokens = settings.worker_threads
    try:
        live = LiveEngine(settings.live_config())
    except (BundleError, OSError, StoreUnavailable) as err:  # OSError: the state directory cannot be created or written
        logger.error("cannot start: {}", err)
        raise RuntimeError(f"cannot start: {err}") from err
    app.state.service, app.state.settings = live, settings
    app.state.io_limiter = anyio.CapacityLimiter(settings.io_threads)
    app.openapi_schema = None  # regenerated with these settings' limits on the next request
    logger.info("serving bundle {} ({} items)", live.engine.version, live.engine.searchable_items)
    try:  # the engine closes also when tracing cannot start (an OTEL_* variable it refuses)
        await live.aopen()  # the store's connections for this loop, before the first request rather than in it
        with tracing.started(settings) as app.state.tracer_provider:
            yield
    finally:
        try:
            await live.aclose()
        finally:
            live.close()
            metrics.worker_exited(os.getpid())


def create_app() -> FastAPI:
    app = FastAPI(title="recsys", version="0.2.0", default_response_class=FastJSONResponse, lifespan=lifespan,
                  description="Two-stage recommendations: two-tower recall over an HNSW index, then a LambdaRank "
                              "re-ranker. Every error answers `{\"error\": message}`.")
    app.add_middleware(BodyLimit)  # added first, so it runs inside ``Observe`` and its 413s / 408s are counted
    app.add_middleware(Observe)
    errors.install(app)
    tracing.record_handled_errors(app)
    for router in (probes.router, recommend.router, page.router):
        include(app, router)
    app.mount("/static", StaticFiles(directory=page.STATIC), name="static")
    for router in (events.router, admin.router, experiments.router, experiments.admin):
        include(app, router)
    openapi.install(app)
    return app


def include(app: FastAPI, router: APIRouter) -> None:
    """A resource's routes, flat on the app. Each route already carries its router's tags and dependencies;
    ``app.include_router`` would add one lazily resolved entry per router instead (FastAPI 0.16x), hiding the
    routes from ``app.routes`` (the 405 handler's ``Allow`` and the probes' route check read it)."""
    app.router.routes.extend(router.routes)


app = create_app()
