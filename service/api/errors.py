"""Every error the API answers, in the one body shape ``{"error": message}``: core errors mapped to their
statuses, the HTTP layer's own refusals (``ApiError``), validation problems and framework errors."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from loguru import logger
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from recsys.errors import Conflict, InvalidInput, RecsysError, Unavailable, UnknownId
from recsys.state.protocol import StoreUnavailable
from service.http import REQUEST_ID, FastJSONResponse, allowed_methods, error, validation_summary

RETRY = {"Retry-After": "1"}  # a 503's: the store's reads are tried again after a second
STATUS: dict[type[RecsysError], int] = {UnknownId: 404, InvalidInput: 422, Conflict: 409, Unavailable: 503}


class ApiError(Exception):
    """A refusal of the HTTP layer's own (a limit of these settings, the admin token, a failed reload)."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers


def status_of(err: RecsysError) -> int:
    return STATUS.get(type(err), 422)


def install(app: FastAPI) -> None:
    """Register the handlers on ``app``."""

    @app.exception_handler(ApiError)
    async def api_error(_: Request, err: ApiError):
        return error(err.status, err.message, err.headers)

    @app.exception_handler(RecsysError)
    async def core_error(_: Request, err: RecsysError):
        status = status_of(err)
        return error(status, err.message, RETRY if status == 503 else None)

    @app.exception_handler(StoreUnavailable)
    async def store_unavailable(request: Request, err: StoreUnavailable):
        """A write may or may not have been recorded (a reply lost after the store committed it): the client retries
        with the same idempotency key, which records it once. Reads keep serving from the bundle meanwhile."""
        logger.warning("state store unavailable: {}", err)
        retry = "retry" if request.method in ("GET", "HEAD") else ("a write may have been recorded before the failure: "
                                                                  "retry it with the same Idempotency-Key (or event_id) "
                                                                  "and it is recorded once")
        return error(503, f"state store unavailable: {err}; {retry}", RETRY)

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
    async def unexpected(request: Request, err: Exception):
        """Logged by ``service.http.Observe``, where the request's ids are; this runs outside it, so the answer
        takes the request id from the scope: the one answer whose message sends the reader to the logs."""
        request_id = request.scope.get(REQUEST_ID)
        return error(500, f"internal error ({type(err).__name__}); see logs", {"X-Request-Id": request_id} if request_id else None)
