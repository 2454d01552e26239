"""Tracing: OTLP JSON lines of finished spans, and one package's trace through the
pipeline (the W3C traceparent in Kafka headers) from the CLI's send to the shard stage."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from conftest import REPO, Pipeline
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from exforge.core import tracing
from exforge.core.tracing import JsonLinesExporter, kafka_headers

UNSEEN = REPO / "tests" / "fixtures" / "unseen_project"
STAGES = ("ingest", "parse", "dedup", "neardup", "instruct", "shard")


def spans_of(path: Path) -> list[dict[str, Any]]:
    """Every span in an OTLP JSON lines file, with its service name."""
    spans = []
    for line in path.read_text().splitlines():
        for resource_spans in json.loads(line)["resourceSpans"]:
            attributes = resource_spans["resource"]["attributes"]
            service = next(
                a["value"]["stringValue"] for a in attributes if a["key"] == "service.name"
            )
            for scope in resource_spans["scopeSpans"]:
                spans.extend({**span, "service": service} for span in scope["spans"])
    return spans


def test_finished_spans_are_otlp_json_lines_with_hex_ids(tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(JsonLinesExporter(path)))
    tracer = provider.get_tracer("test")
    with tracer.start_as_current_span("outer") as outer:
        context = outer.get_span_context()
        [(name, value)] = kafka_headers()
        assert name == "traceparent"
        assert value.decode().startswith(f"00-{context.trace_id:032x}-{context.span_id:016x}-")
        with tracer.start_as_current_span("inner", attributes={"stage": "parse"}):
            pass
    provider.shutdown()
    inner, parent = spans_of(path)
    trace_id = format(outer.get_span_context().trace_id, "032x")
    assert inner["traceId"] == parent["traceId"] == trace_id
    assert (
        inner["parentSpanId"]
        == parent["spanId"]
        == format(outer.get_span_context().span_id, "016x")
    )
    assert inner["name"] == "inner" and inner["attributes"][0]["key"] == "stage"
    assert int(inner["endTimeUnixNano"]) >= int(inner["startTimeUnixNano"]) > 0


def test_traced_calls_and_client_spans_carry_the_trace_to_the_server() -> None:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    trace.set_tracer_provider(provider)  # this process's only provider (none was set)

    @tracing.traced("train checkpoint")
    def save(step: int) -> str:
        span, metadata = tracing.client_span("triton stream_infer", model="m", version=step)
        span.end()
        return metadata["traceparent"]

    with tracing.consumed(
        "POST /v1/completions", {"traceparent": b"00-" + b"ab" * 16 + b"-" + b"cd" * 8 + b"-01"}
    ):
        carried = save(3)
    client, checkpoint, request = memory.get_finished_spans()
    assert [s.name for s in (client, checkpoint, request)] == [
        "triton stream_infer",
        "train checkpoint",
        "POST /v1/completions",
    ]
    assert {s.context.trace_id for s in (client, checkpoint, request)} == {int("ab" * 16, 16)}
    assert request.parent is not None and request.parent.span_id == int("cd" * 8, 16)
    assert client.parent.span_id == checkpoint.context.span_id  # type: ignore[union-attr]
    assert carried == f"00-{'ab' * 16}-{client.context.span_id:016x}-01"
    assert client.attributes == {"model": "m", "version": 3}


@pytest.mark.slow
def test_one_package_is_one_trace_through_every_stage(pipeline: Pipeline, tmp_path: Path) -> None:
    path = tmp_path / "traces.jsonl"
    pipeline.env["EXFORGE_TRACE_FILE"] = str(path)
    requested = pipeline.json("ingest", "dir", str(UNSEEN))
    pipeline.run_until_idle()

    spans = spans_of(path)
    by_trace: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for span in spans:
        by_trace[span["traceId"]].append(span)
    [send] = [s for s in spans if s["name"].endswith("sources.requests send")]
    assert send["service"] == "exforge-ingest"
    package_trace = by_trace[send["traceId"]]
    stages = {
        s["name"].removesuffix(" process")
        for s in package_trace
        if s["service"] == "exforge-worker"
    }
    assert set(STAGES) <= stages, f"the package's trace has only {sorted(stages)}"
    ids = {s["spanId"] for s in package_trace}
    assert all(s.get("parentSpanId", "") in ids for s in package_trace if s is not send)
    assert "parentSpanId" not in send or not send["parentSpanId"], "the CLI's send is the root"
    samples = pipeline.json("dataset", "stats")["samples"]["total"]
    shard_spans = [s for s in package_trace if s["name"] == "shard process"]
    assert len(shard_spans) == samples, "every sample of the package is in its trace"
    assert requested["source_id"]
