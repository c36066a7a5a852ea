"""What routes declare: the live engine (loaded in the lifespan), the settings, the admin check.

Each is ``async def``: FastAPI runs a plain ``def`` dependency in its thread pool, one thread hand-off per
dependency per request (a measurable share of a ~1 ms request) for work that never blocks."""
from __future__ import annotations

import hashlib
import hmac
from typing import Annotated, Any

import orjson
from fastapi import Depends, Header, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from recsys.engine.engine import Engine
from recsys.live import LiveEngine
from recsys.state.protocol import Once
from service.api.errors import ApiError
from service.config import Settings
from service.schemas import IDEMPOTENCY_KEY, MAX_ID_CHARS

# An item id in a path, checked as a body's is: blank or over-long is a 422 saying so, not a 404 for an unknown id.
PathId = Annotated[str, Path(max_length=MAX_ID_CHARS, pattern=r"\S", description="an item id; may contain '/'")]

bearer = HTTPBearer(auto_error=False, description="RECSYS_ADMIN_TOKEN; admin routes answer 403 when it is not set")


async def get_live(request: Request) -> LiveEngine:
    return request.app.state.service


async def get_engine(request: Request) -> Engine:
    return request.app.state.service.engine


async def get_served_settings(request: Request) -> Settings:
    """The settings the live engine was started with (``get_settings()`` may have moved on in tests)."""
    return request.app.state.settings


async def require_admin(settings: Annotated[Settings, Depends(get_served_settings)],
                        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]) -> None:
    """The scheme name is matched case-insensitively (RFC 7235); the token in constant time."""
    token = settings.admin_token
    if token is None:
        raise ApiError(403, "admin endpoints are disabled: set RECSYS_ADMIN_TOKEN to enable them")
    given = credentials.credentials.encode() if credentials is not None else b""
    if not hmac.compare_digest(given, token.get_secret_value().encode()):
        raise ApiError(401, "missing or wrong bearer token", {"WWW-Authenticate": "Bearer"})


def once(key: str | None, request: Any) -> Once | None:
    """A write's idempotency key with the digest of what it asks (``request``: its JSON-able form), so that the key
    reused for another request is told apart from a retry."""
    if key is None:
        return None
    return Once(key, hashlib.sha256(orjson.dumps(request, option=orjson.OPT_SORT_KEYS)).hexdigest()[:32])


def replay_headers(replayed: bool) -> dict[str, str] | None:
    """A retry answered from the store says so (the header Stripe's API uses)."""
    return {"Idempotent-Replayed": "true"} if replayed else None


EngineDep = Annotated[Engine, Depends(get_engine)]
IdempotencyKey = Annotated[str | None, Header(alias="Idempotency-Key", description=(
    "a client-chosen key for this write: a retry with the same key and request within the idempotency window "
    "(RECSYS_IDEMPOTENCY_WINDOW_S) is recorded once and answered as the first time, with `Idempotent-Replayed: true`; "
    "the same key with another request is refused (422)"), **IDEMPOTENCY_KEY)]
LiveDep = Annotated[LiveEngine, Depends(get_live)]
ServedSettings = Annotated[Settings, Depends(get_served_settings)]
ADMIN = dict(dependencies=[Depends(require_admin)], tags=["admin"])
