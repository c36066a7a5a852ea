"""Probes and metrics: ``/health``, ``/ready``, ``/metrics``."""
from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from prometheus_client import CONTENT_TYPE_LATEST

from service import metrics
from service.http import FastJSONResponse, error, errors
from service.schemas import HealthResponse, ReadyResponse

router = APIRouter(tags=["probes"])


@router.get("/health", response_model=HealthResponse)
def health():
    return FastJSONResponse({"status": "alive"})


@router.get("/ready", response_model=ReadyResponse, responses=errors(503))
def ready(request: Request):
    """Ready once a bundle is loaded. With the state store unreachable the replica still serves reads from
    the bundle (writes get 503), so it stays in the load balancer and says ``degraded`` and why."""
    live = getattr(request.app.state, "service", None)
    if live is None:
        return error(503, "bundle not loaded")
    engine, problem = live.engine, live.health()
    return FastJSONResponse({"status": "degraded" if problem else "ready", "state_store": problem or "ok",
                             "bundle_version": engine.version, "items": engine.searchable_items,
                             "rating_scale": dict(zip(("min", "max"), engine.rating_scale))})


@router.get("/metrics", response_class=PlainTextResponse,
            responses={200: {"content": {CONTENT_TYPE_LATEST.split(";")[0]: {}}, "description": "Prometheus text format"}})
def prometheus_metrics():
    return PlainTextResponse(metrics.exposition(), media_type=CONTENT_TYPE_LATEST)
