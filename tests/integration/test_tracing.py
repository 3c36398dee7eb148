"""Traces from intake to result, through NATS headers and across the batch hop
(issue 6, must-show 1)."""

from __future__ import annotations

import json
from typing import Any

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from tests.conftest import read_stream


def producer() -> tuple[Any, InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return provider.get_tracer("producer"), exporter


def headers_of(tracer: Any, name: str) -> tuple[dict[str, str], Any]:
    with tracer.start_as_current_span(name) as span:
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier)
    return carrier, span.get_span_context()


async def test_one_batch_item_and_one_sync_item_are_traced_from_intake_to_result(
    make_daemon, nc, prefix, emulator
) -> None:
    spans = InMemorySpanExporter()
    daemon = await make_daemon(span_exporter=spans, batching={"max_wait_s": 0.3, "poll_interval_s": 0.2})
    tracer, _ = producer()
    js = nc.jetstream()
    batch_headers, batch_ctx = headers_of(tracer, "send batch item")
    await js.publish(
        f"{prefix}.in.tags",
        json.dumps({"id": "tb", "text": "traced through a batch"}).encode(),
        headers=batch_headers,
    )
    sync_headers, sync_ctx = headers_of(tracer, "send sync item")
    await js.publish(
        f"{prefix}.in.tags",
        json.dumps({"id": "ts", "text": "traced at once", "priority": "urgent"}).encode(),
        headers=sync_headers,
    )
    msgs = await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 2, timeout_s=30)
    by_id = {json.loads(m.data)["id"]: m for m in msgs}
    assert set(by_id) == {"tb", "ts"}

    finished = spans.get_finished_spans()

    def trace_of(ctx: Any) -> dict[str, Any]:
        return {s.name: s for s in finished if s.context.trace_id == ctx.trace_id}

    # the batch item: producer → enrich.intake → enrich.buffer → (batch hop) → enrich.batch.result
    batch = trace_of(batch_ctx)
    assert {"enrich.intake", "enrich.buffer", "enrich.batch.result"} <= set(batch), sorted(batch)
    assert batch["enrich.intake"].parent.span_id == batch_ctx.span_id
    assert batch["enrich.buffer"].parent.span_id == batch["enrich.intake"].context.span_id
    assert batch["enrich.batch.result"].parent.span_id == batch["enrich.buffer"].context.span_id
    result_span = batch["enrich.batch.result"]
    assert result_span.attributes["enrichd.item_id"] == "tb"
    assert str(result_span.attributes["enrichd.batch_id"]).startswith("batch_")
    assert batch["enrich.intake"].attributes["enrichd.route"] == "batch"
    # the result event carries the trace on to its consumers
    carried = TraceContextTextMapPropagator().extract(dict(by_id["tb"].headers or {}))
    from opentelemetry import trace

    assert trace.get_current_span(carried).get_span_context().trace_id == batch_ctx.trace_id

    # the sync item: producer → enrich.intake → enrich.provider.call
    sync = trace_of(sync_ctx)
    assert {"enrich.intake", "enrich.provider.call"} <= set(sync), sorted(sync)
    assert sync["enrich.provider.call"].parent.span_id == sync["enrich.intake"].context.span_id
    assert sync["enrich.provider.call"].attributes["enrichd.attempt"] == 1
    assert "traceparent" in (by_id["ts"].headers or {})
    # the batch itself: flush and submit spans
    names = {s.name for s in finished}
    assert {"enrich.batch.flush", "enrich.batch.submit"} <= names


async def test_sync_request_reply_is_traced_by_faststream(make_daemon, nc, prefix) -> None:
    spans = InMemorySpanExporter()
    await make_daemon(span_exporter=spans)
    tracer, _ = producer()
    headers, ctx = headers_of(tracer, "request")
    reply = await nc.request(f"{prefix}.sync.tags", b'{"text": "trace me"}', timeout=10, headers=headers)
    assert json.loads(reply.data)["status"] == "ok"
    mine = [s for s in spans.get_finished_spans() if s.context.trace_id == ctx.trace_id]
    assert any(s.name == "enrich.provider.call" for s in mine), [s.name for s in mine]
    assert any("sync" in s.name for s in mine if s.name != "enrich.provider.call"), [s.name for s in mine]
