"""OpenTelemetry tracing (``service/tracing.py``, the stage spans of ``recsys.metrics.timed``): the spans of a request
caught by the SDK's in-memory exporter, added beside the exporter the settings chose; that exporter's OTLP/HTTP
requests caught by a small receiver on a loopback port. Each test starts its own service: the tracer is process-wide
state, so two services of different settings must not overlap."""
from __future__ import annotations

import ast
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from loguru import logger
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.sdk.trace import SpanProcessor
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode, format_trace_id

from recsys import metrics as core_metrics
from service import tracing
from tests.servicekit import AUTH

STAGES = {"features", "user_encoding", "ann_search", "rerank"}  # the stages of recsys_stage_seconds
CALLER_TRACE, CALLER_SPAN = "0af7651916cd43dd8448eb211c80319c", "b7ad6b7169203331"


class Receiver(ThreadingHTTPServer):
    """An OTLP/HTTP collector that keeps what it is sent: ``(path, content type, body)`` per request."""

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Collect)
        self.received: list[tuple[str, str, bytes]] = []

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Collect(BaseHTTPRequestHandler):
    def do_POST(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        self.server.received.append((self.path, self.headers["Content-Type"], body))
        self.send_response(200)
        self.send_header("Content-Type", "application/x-protobuf")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    server = Receiver()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class Threads(SpanProcessor):
    """The thread each span started on, by span name."""

    def __init__(self):
        self.started: dict[str, str] = {}

    def on_start(self, span, parent_context=None):
        self.started[span.name] = threading.current_thread().name


@contextmanager
def traced(start, receiver: Receiver, monkeypatch, **settings) -> Iterator[tuple]:
    """The service exporting by OTLP to ``receiver`` (the standard base-URL variable), with an in-memory exporter
    beside it: yields the client, that exporter and the start thread of each span."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    for name in ("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_TRACES_SAMPLER", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    with start(tracing="otlp", **settings) as client:
        memory, threads = InMemorySpanExporter(), Threads()
        client.app.state.tracer_provider.add_span_processor(SimpleSpanProcessor(memory))
        client.app.state.tracer_provider.add_span_processor(threads)
        yield client, memory, threads


@contextmanager
def log_records(level: str = "DEBUG") -> Iterator[list[dict]]:
    """The loguru records emitted meanwhile (a sink beside the service's)."""
    records: list[dict] = []
    sink = logger.add(lambda message: records.append(message.record), level=level)
    try:
        yield records
    finally:
        logger.remove(sink)


def known_user(client) -> str:
    return client.app.state.service.engine.bundle.catalog["user_ids"][0]


def server_span(memory: InMemorySpanExporter):
    (span,) = [s for s in memory.get_finished_spans() if s.kind == SpanKind.SERVER]
    return span


def test_a_recommendation_is_a_server_span_with_a_child_per_stage(start, receiver, monkeypatch):
    with traced(start, receiver, monkeypatch) as (client, memory, threads):
        response = client.get("/recommend", params={"user_id": known_user(client), "k": 5})
        assert response.status_code == 200
        spans = memory.get_finished_spans()
    server = server_span(memory)
    assert server.name == "GET /recommend"
    assert server.attributes["http.request.method"] == "GET" and server.attributes["http.route"] == "/recommend"
    assert server.attributes["http.response.status_code"] == 200
    assert server.parent is None and server.status.status_code == StatusCode.UNSET
    stages = {s.name: s for s in spans if s is not server}
    assert set(stages) == STAGES == set(response.json()["timings_ms"])  # the spans and the timings: one source
    for span in stages.values():
        assert span.kind == SpanKind.INTERNAL
        assert span.context.trace_id == server.context.trace_id and span.parent.span_id == server.context.span_id
        assert server.start_time <= span.start_time <= span.end_time <= server.end_time
    # /recommend answers on the event loop, in the request's own thread
    assert all(threads.started[name] == threads.started["GET"] for name in STAGES), threads.started


def test_a_batch_runs_its_stages_in_a_worker_thread_as_the_requests_children(start, receiver, monkeypatch):
    with traced(start, receiver, monkeypatch) as (client, memory, threads):
        response = client.post("/recommend/batch", json={"user_ids": [known_user(client)], "k": 3})
        assert response.status_code == 200
        spans = memory.get_finished_spans()
    server = server_span(memory)
    stages = {s.name: s for s in spans if s is not server}
    assert server.name == "POST /recommend/batch" and set(stages) == STAGES
    for span in stages.values():
        assert span.context.trace_id == server.context.trace_id and span.parent.span_id == server.context.span_id
    # the handler is sync: FastAPI's thread pool ran the stages, and the context crossed to it
    assert all(threads.started[name] != threads.started["POST"] for name in STAGES), threads.started


def test_a_caller_traceparent_is_continued(start, receiver, monkeypatch):
    with traced(start, receiver, monkeypatch) as (client, memory, _):
        client.post("/recommend", json={"user_id": known_user(client)},
                    headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}).raise_for_status()
    server = server_span(memory)
    assert server.name == "POST /recommend"
    assert format_trace_id(server.context.trace_id) == CALLER_TRACE
    assert server.parent.is_remote and f"{server.parent.span_id:016x}" == CALLER_SPAN
    assert {format_trace_id(s.context.trace_id) for s in memory.get_finished_spans()} == {CALLER_TRACE}


def test_the_sample_ratio_leaves_the_decision_to_a_caller_that_made_one(start, receiver, monkeypatch):
    """Ratio 0 records no trace begun here, but continues a caller's sampled one (parent-based)."""
    with traced(start, receiver, monkeypatch, tracing_sample_ratio="0") as (client, memory, _):
        user = known_user(client)
        client.get("/recommend", params={"user_id": user}).raise_for_status()
        assert memory.get_finished_spans() == ()
        client.get("/recommend", params={"user_id": user},
                   headers={"traceparent": f"00-{CALLER_TRACE}-{CALLER_SPAN}-01"}).raise_for_status()
        assert {s.name for s in memory.get_finished_spans()} == STAGES | {"GET /recommend"}


def test_the_log_lines_of_a_request_carry_its_trace_id(start, receiver, monkeypatch):
    """A failed reload logs a warning from the worker thread that runs the handler; the trace and span ids are
    those of the request's server span, next to the request id."""
    with traced(start, receiver, monkeypatch) as (client, memory, _), log_records() as records:
        response = client.post("/admin/reload", json={"version": "no-such-version"}, headers={**AUTH, "x-request-id": "r-1"})
        assert response.status_code == 409
    server = server_span(memory)
    (line,) = [r for r in records if "reload of" in r["message"]]
    assert line["thread"].name != threading.main_thread().name
    assert line["extra"] == {"request_id": "r-1", "trace_id": format_trace_id(server.context.trace_id),
                             "span_id": f"{server.context.span_id:016x}"}


def test_error_requests_mark_their_spans(start, receiver, monkeypatch):
    """A 4xx keeps its status code and records why as an exception event (by the OTel HTTP conventions a client's
    error is not the server span's: status unset); an unhandled exception makes the span an error, and its log
    line carries the trace id too (it is logged inside the request, though answered outside it)."""
    with traced(start, receiver, monkeypatch) as (client, memory, _), log_records() as records:
        assert client.get("/recommend", params={"user_id": "nobody-at-all"}).status_code == 404
        assert client.get("/recommend", params={"user_id": known_user(client), "k": 0}).status_code == 422
        assert client.get("/no-such-route").status_code == 404
        monkeypatch.setattr(client.app.state.service, "recommend", _broken)
        with pytest.raises(RuntimeError):
            client.get("/recommend", params={"user_id": known_user(client)})
    unknown, invalid, unrouted, broken = sorted((s for s in memory.get_finished_spans() if s.kind == SpanKind.SERVER),
                                                key=lambda s: s.start_time)
    assert [s.name for s in (unknown, invalid, unrouted, broken)] == ["GET /recommend", "GET /recommend", "GET", "GET /recommend"]
    assert [s.attributes["http.response.status_code"] for s in (unknown, invalid, unrouted, broken)] == [404, 422, 404, 500]
    assert "http.route" not in unrouted.attributes
    for span, kind, words in ((unknown, "UnknownId", "nobody-at-all"), (invalid, "RequestValidationError", "'k'"),
                              (unrouted, "HTTPException", "Not Found")):
        assert span.status.status_code == StatusCode.UNSET
        (event,) = span.events
        assert event.name == "exception" and event.attributes["exception.type"].endswith(kind)
        assert words in event.attributes["exception.message"]
    assert broken.status.status_code == StatusCode.ERROR and broken.attributes["error.type"] == "RuntimeError"
    assert [e.attributes["exception.message"] for e in broken.events] == ["the engine broke"]
    (line,) = [r for r in records if r["message"] == "unhandled error"]
    assert line["exception"].value is not None and line["extra"]["trace_id"] == format_trace_id(broken.context.trace_id)


def _broken(*args, **kwargs):
    raise RuntimeError("the engine broke")


def test_off_by_default_no_span_and_no_trace_id(start):
    with start() as client, log_records() as records:
        assert client.app.state.tracer_provider is None
        assert tracing.TRACER is None and core_metrics._tracer is None
        client.get("/recommend", params={"user_id": known_user(client)}).raise_for_status()
        assert client.post("/admin/reload", json={"version": "no-such-version"}, headers=AUTH).status_code == 409
    (line,) = [r for r in records if "reload of" in r["message"]]
    assert set(line["extra"]) == {"request_id"}


def test_tracing_ends_with_the_service(start, receiver, monkeypatch):
    with traced(start, receiver, monkeypatch):
        assert tracing.TRACER is not None and core_metrics._tracer is not None
    assert tracing.TRACER is None and core_metrics._tracer is None


def test_the_otlp_setting_exports_to_the_standard_endpoint(start, receiver, monkeypatch):
    """End to end: the spans reach the collector as OTLP/HTTP protobuf at ``<OTEL_EXPORTER_OTLP_ENDPOINT>/v1/traces``,
    named for this service; the batch still queued is flushed when the service stops."""
    with traced(start, receiver, monkeypatch) as (client, _, _):
        client.get("/recommend", params={"user_id": known_user(client)}).raise_for_status()
    assert receiver.received, "nothing exported"
    assert {(path, kind) for path, kind, _ in receiver.received} == {("/v1/traces", "application/x-protobuf")}
    names, services = set(), set()
    for _, _, body in receiver.received:
        request = ExportTraceServiceRequest.FromString(body)
        for resource_spans in request.resource_spans:
            services |= {a.value.string_value for a in resource_spans.resource.attributes if a.key == "service.name"}
            names |= {span.name for scope in resource_spans.scope_spans for span in scope.spans}
    assert services == {"recsys"}
    assert STAGES | {"GET /recommend"} <= names


def test_the_core_uses_the_opentelemetry_api_alone():
    """The core (recsys) may time its stages into spans, but the SDK and the exporters are the service's choice
    (import-linter sees ``opentelemetry`` as one external package, so this reads the imports itself)."""
    root = Path(__file__).resolve().parents[2] / "recsys"
    imported = {(path.name, node.module if isinstance(node, ast.ImportFrom) else alias.name)
                for path in root.rglob("*.py") for node in ast.walk(ast.parse(path.read_text()))
                if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    otel = {(name, module) for name, module in imported if module and module.startswith("opentelemetry")}
    assert otel and not any(module.startswith(("opentelemetry.sdk", "opentelemetry.exporter")) for _, module in otel), otel
