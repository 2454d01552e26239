"""Tracing with OpenTelemetry: one trace per package (or request) across processes.

The W3C `traceparent` travels in Kafka message headers, so a package's trace runs
ingest → parse → dedup → near-dup → instruct → shard across workers; the gateway carries
it to Triton in gRPC metadata; the trainer makes spans for its stages and checkpoints.

Exporters, chosen when a process starts (`setup`):
* `EXFORGE_TRACE_FILE=PATH`: every finished span is appended to PATH as one line of
  OTLP JSON (an `ExportTraceServiceRequest`, ids in hex), for local use;
* the standard `OTEL_*` variables: `OTEL_TRACES_EXPORTER=otlp` (or an
  `OTEL_EXPORTER_OTLP_ENDPOINT` / `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) sends OTLP over
  HTTP to a collector (Jaeger in the compose stack), `console` prints spans, `none` is off;
  `OTEL_SERVICE_NAME` names the service.
Without either, spans are not recorded and tracing costs next to nothing.
"""

from __future__ import annotations

import atexit
import base64
import functools
import json
import os
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.trace import Span, SpanKind
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

TRACE_FILE_ENV = "EXFORGE_TRACE_FILE"
TRACEPARENT = "traceparent"
TRACER = "exforge"

P = ParamSpec("P")
R = TypeVar("R")

_propagator = TraceContextTextMapPropagator()
_configured: list[TracerProvider] = []

Headers = Sequence[tuple[str, bytes]] | Mapping[str, bytes] | None


def _hex_ids(value: Any) -> Any:
    """OTLP JSON wants trace and span ids as hex; protobuf's JSON form has base64."""
    if isinstance(value, dict):
        return {
            k: base64.b64decode(v).hex()
            if k in ("traceId", "spanId", "parentSpanId") and isinstance(v, str)
            else _hex_ids(v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [_hex_ids(v) for v in value]
    return value


def otlp_json(spans: Sequence[ReadableSpan]) -> str:
    """Finished spans as one line of OTLP JSON (`ExportTraceServiceRequest`)."""
    from google.protobuf.json_format import MessageToDict
    from opentelemetry.exporter.otlp.proto.common.trace_encoder import encode_spans

    message = MessageToDict(encode_spans(spans))
    return json.dumps(_hex_ids(message), separators=(",", ":"))


class JsonLinesExporter(SpanExporter):
    """Appends each export to a file as one OTLP JSON line (several processes may share
    the file: each line is one `write` of an `O_APPEND` file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        path.parent.mkdir(parents=True, exist_ok=True)

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        line = (otlp_json(spans) + "\n").encode()
        with self._lock:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, line)
            finally:
                os.close(fd)
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        return None


def _otlp_wanted(environ: Mapping[str, str]) -> bool:
    chosen = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if chosen:
        return "otlp" in chosen.split(",")
    return bool(
        environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def setup(service: str, environ: Mapping[str, str] | None = None) -> bool:
    """Install the tracer provider of this process once; True when spans are exported."""
    if _configured:
        return True
    env = os.environ if environ is None else environ
    processors: list[Any] = []
    trace_file = env.get(TRACE_FILE_ENV)
    if trace_file:
        processors.append(SimpleSpanProcessor(JsonLinesExporter(Path(trace_file))))
    if _otlp_wanted(env):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        processors.append(BatchSpanProcessor(OTLPSpanExporter()))
    if "console" in env.get("OTEL_TRACES_EXPORTER", "").lower().split(","):
        processors.append(SimpleSpanProcessor(ConsoleSpanExporter()))
    if not processors:
        return False
    resource = Resource.create({"service.name": env.get("OTEL_SERVICE_NAME", service)})
    provider = TracerProvider(resource=resource)
    for processor in processors:
        provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    _configured.append(provider)
    atexit.register(shutdown)
    return True


def shutdown() -> None:
    """Flush and stop the exporters (before the process exits)."""
    while _configured:
        _configured.pop().shutdown()


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER)


def _carrier(headers: Headers) -> dict[str, str]:
    if not headers:
        return {}
    items = headers.items() if isinstance(headers, Mapping) else headers
    return {
        k.lower(): v.decode(errors="replace") if isinstance(v, bytes) else str(v)
        for k, v in items
        if k.lower() == TRACEPARENT or k.lower() == "tracestate"
    }


def traceparent() -> str | None:
    """The current span's W3C traceparent (None outside a recorded span)."""
    carrier: dict[str, str] = {}
    _propagator.inject(carrier)
    return carrier.get(TRACEPARENT)


def kafka_headers(parent: str | None = None) -> list[tuple[str, bytes]]:
    """Headers that carry `parent` (default: the current span) to the consumer."""
    value = parent or traceparent()
    return [(TRACEPARENT, value.encode())] if value else []


@contextmanager
def consumed(
    name: str,
    headers: Headers,
    attributes: Mapping[str, Any] | None = None,
    kind: SpanKind = SpanKind.CONSUMER,
) -> Iterator[Span]:
    """A span for one message (or, kind SERVER, one request), child of the sender's span
    when its headers carry a traceparent (else the root of a new trace)."""
    parent = _propagator.extract(_carrier(headers))
    with tracer().start_as_current_span(
        name, context=parent, kind=kind, attributes=dict(attributes or {})
    ) as span:
        yield span


def client_span(name: str, **attributes: Any) -> tuple[Span, dict[str, str]]:
    """A client span (the caller ends it) and the metadata that carries it to the server.
    It is not made current, so it may live inside an async generator."""
    started = tracer().start_span(name, kind=SpanKind.CLIENT, attributes=attributes)
    carrier: dict[str, str] = {}
    _propagator.inject(carrier, context=trace.set_span_in_context(started))
    return started, carrier


@contextmanager
def produced(topic: str, key: str) -> Iterator[Span]:
    """A producer span for one message sent from outside a stage (the CLI, replays)."""
    attributes = {"messaging.system": "kafka", "messaging.destination.name": topic}
    with tracer().start_as_current_span(
        f"{topic} send", kind=SpanKind.PRODUCER, attributes={**attributes, "key": key}
    ) as current:
        yield current


@contextmanager
def span(name: str, **attributes: Any) -> Iterator[Span]:
    """An internal span in the current trace."""
    with tracer().start_as_current_span(name, attributes=attributes) as current:
        yield current


def traced(name: str) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """A decorator: each call of the function is a span `name` in the current trace."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        @functools.wraps(function)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            with tracer().start_as_current_span(name):
                return function(*args, **kwargs)

        return wrapper

    return decorate
