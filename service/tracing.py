"""OpenTelemetry tracing, off by default (``RECSYS_TRACING``): a server span per HTTP request, named for its route
(``GET /recommend``), with a child span per engine stage (``recsys.metrics.timed`` opens them: the stages of
``recsys_stage_seconds``, timed by the same code), and the trace id in every log line of a traced request.

What the OpenTelemetry standard configures by environment is read from it, so an operator sets tracing up as
for any other service: the OTLP endpoint (``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``..._TRACES_ENDPOINT``), its
headers, timeout and compression, the service name (``OTEL_SERVICE_NAME``; "recsys" when unset), the
propagators (``OTEL_PROPAGATORS``; W3C ``traceparent`` by default) and the sampler (``OTEL_TRACES_SAMPLER``;
unset, a parent-based trace-id ratio of ``RECSYS_TRACING_SAMPLE_RATIO``).

The tracer provider is the app's own, not the process-global one (which can be set only once): a restart in one
process (the tests do it) starts afresh, and tracing off leaves nothing behind. Off, a request costs one check of
``TRACER``: no span object, no header parsing.
"""
from __future__ import annotations

import os
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from fastapi import FastAPI, Request
from opentelemetry import context, trace
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.propagate import extract
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ParentBasedTraceIdRatio, Sampler
from opentelemetry.trace import SpanKind, Status, StatusCode, format_span_id, format_trace_id

from recsys import metrics as core_metrics
from service.config import Settings

TRACER: trace.Tracer | None = None  # the server spans' tracer while tracing is on
# A span name holds the method; any other method a client sends is "_OTHER" (OTel HTTP conventions), so that
# names stay few whatever is sent.
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
Handler = Callable[[Request, Exception], Awaitable]


@contextmanager
def started(settings: Settings) -> Iterator[TracerProvider | None]:
    """Tracing on, for the app's lifetime, when the settings ask for it (the provider, else None); at the end the
    spans still queued are exported (the batch processor flushes on shutdown) and tracing is off again."""
    if settings.tracing == "off":
        yield None
        return
    provider = TracerProvider(sampler=_sampler(settings.tracing_sample_ratio), resource=_resource())
    provider.add_span_processor(BatchSpanProcessor(_exporter(settings.tracing)))
    _use(provider.get_tracer("service"), provider.get_tracer("recsys"))
    try:
        yield provider
    finally:
        _use(None, None)
        provider.shutdown()


def _use(server: trace.Tracer | None, stages: trace.Tracer | None) -> None:
    global TRACER
    TRACER = server
    core_metrics.trace_stages(stages)


def _sampler(ratio: float) -> Sampler | None:
    """None where ``OTEL_TRACES_SAMPLER`` is set: the SDK then builds the sampler it names."""
    return None if os.environ.get("OTEL_TRACES_SAMPLER") else ParentBasedTraceIdRatio(ratio)


def _resource() -> Resource:
    """The resource the standard variables describe (``OTEL_RESOURCE_ATTRIBUTES``, ``OTEL_SERVICE_NAME``), named
    "recsys" where they name no service (the SDK's fallback, "unknown_service:python", says nothing)."""
    resource = Resource.create()
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "recsys"}))
    return resource


def _exporter(kind: str) -> SpanExporter:
    """OTLP/HTTP with protobuf (lighter than gRPC), to the endpoint the standard variables name; or JSON on stdout."""
    return OTLPSpanExporter() if kind == "otlp" else ConsoleSpanExporter()


class RequestSpan:
    """One HTTP request's server span, current while the app handles the request: the stages' spans are its
    children, in the worker threads too (anyio runs a sync handler in a copy of the request's context). A
    caller's ``traceparent`` makes it a child of the caller's span, in the caller's trace."""

    __slots__ = ("span", "token", "method")

    def __init__(self, tracer: trace.Tracer, scope: dict):
        self.method = scope["method"] if scope["method"] in METHODS else "_OTHER"
        parent = extract({name.decode("latin-1"): value.decode("latin-1") for name, value in scope["headers"]})
        self.span = tracer.start_span(self.method, parent, SpanKind.SERVER, {
            "http.request.method": self.method, "url.path": scope["path"], "url.scheme": scope["scheme"]})
        self.token = context.attach(trace.set_span_in_context(self.span, parent))

    def log_ids(self) -> dict[str, str]:
        """``trace_id`` and ``span_id`` for the request's log lines, in the hex that tracing backends search by."""
        ids = self.span.get_span_context()
        return {"trace_id": format_trace_id(ids.trace_id), "span_id": format_span_id(ids.span_id)}

    def end(self, scope: dict, status: int, error: BaseException | None) -> None:
        """Named for the route template the router matched, never the path (ids in span names would make every
        name unique). By the OTel HTTP conventions a 5xx or an escaping exception makes a server span an error,
        while a 4xx is the client's: it keeps its status code and the exception event ``record_handled_errors``
        adds."""
        span, route = self.span, getattr(scope.get("route"), "path", None)
        if route is not None:
            span.update_name(f"{self.method} {route}")
            span.set_attribute("http.route", route)
        span.set_attribute("http.response.status_code", status)
        if error is not None:
            span.record_exception(error)
        if status >= 500:
            span.set_attribute("error.type", str(status) if error is None else type(error).__qualname__)
            span.set_status(Status(StatusCode.ERROR, f"HTTP {status}"))
        span.end()
        context.detach(self.token)


def record_handled_errors(app: FastAPI) -> None:
    """Make each of ``app``'s error handlers record the error it answers on the request's span, as an exception
    event: a 404 or 422 span then says why (unknown user 'x', which field). The catch-all handler is left alone:
    it runs outside the request's span, whose ``end`` records that exception itself."""
    for kind, handler in list(app.exception_handlers.items()):
        if kind not in (Exception, 500):
            app.exception_handlers[kind] = _recording(handler)


def _recording(handler: Handler) -> Handler:
    async def recording(request: Request, err: Exception):
        if TRACER is not None:
            trace.get_current_span().record_exception(err)
        return await handler(request, err)

    return recording
