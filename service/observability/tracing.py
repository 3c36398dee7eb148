"""Traces (OpenTelemetry), propagated through NATS headers as W3C ``traceparent``.

A producer that sends ``traceparent`` on an intake message gets the daemon's spans in its
own trace: ``enrich.intake`` (consumer) → ``enrich.provider.call`` per attempt (sync) or
``enrich.buffer`` (batch). For the batch hop the buffered record keeps the intake span's
``traceparent``; when the batch ends, ``enrich.batch.result`` is started under it, so one
item's trace runs from intake to its result even though hours and another replica may lie
between. Result events carry the ``traceparent`` of the span that produced them. Batches
themselves get ``enrich.batch.flush`` / ``enrich.batch.submit`` spans in their own traces.

Tracing is on when ``OTEL_EXPORTER_OTLP_ENDPOINT`` (or ``..._TRACES_ENDPOINT``) is set
(OTLP/HTTP, batched export) or when a span exporter is passed in (tests); otherwise spans
are no-ops and cost next to nothing. FastStream's ``NatsTelemetryMiddleware`` traces the
core-NATS subscribers (``enrich.sync.*``) with the same provider."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager, nullcontext
from typing import Any

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.trace import Tracer
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from service.observability.telemetry import otlp_configured

_PROPAGATOR = TraceContextTextMapPropagator()


def build(service_name: str = "enrichd", exporter: Any = None) -> tuple[Tracer, Any]:
    """(tracer, provider or None). ``exporter``: a SpanExporter to add (exported as each
    span ends); OTLP is added when configured by the standard environment variables."""
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true" or (
        exporter is None and not otlp_configured("traces")
    ):
        return trace.NoOpTracer(), None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    if otlp_configured("traces"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    return provider.get_tracer("enrichd"), provider


def enabled(tracer: Tracer) -> bool:
    """Whether spans from ``tracer`` are recorded (so worth building attributes for)."""
    return not isinstance(tracer, trace.NoOpTracer)


def span(
    tracer: Tracer, name: str, attributes: Callable[[], dict[str, Any]] | None = None, **kwargs: Any
) -> AbstractContextManager[Any]:
    """``tracer.start_as_current_span``, or nothing at all when tracing is off (the
    attributes are only built when they will be recorded)."""
    if not enabled(tracer):
        return nullcontext()
    return tracer.start_as_current_span(name, attributes=attributes() if attributes else None, **kwargs)


def extract(headers: Mapping[str, str] | None) -> Context | None:
    """The remote parent carried by a message's headers, if any."""
    if not headers or "traceparent" not in headers:
        return None
    return _PROPAGATOR.extract(dict(headers))


def from_traceparent(traceparent: str | None) -> Context | None:
    return _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None


def inject(headers: dict[str, str]) -> dict[str, str]:
    """Add the current span's ``traceparent`` (nothing when there is no valid span)."""
    _PROPAGATOR.inject(headers)
    return headers


def current_traceparent() -> str | None:
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent")


def item_attributes(item_id: str, handler: str, **more: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"enrichd.item_id": item_id, "enrichd.handler": handler}
    out.update({f"enrichd.{k}": v for k, v in more.items() if v is not None})
    return out
