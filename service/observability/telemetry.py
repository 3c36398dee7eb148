"""Metrics (OpenTelemetry, exported for Prometheus on ``/metrics``). One MeterProvider and
one Prometheus registry per daemon; instruments are created here and nowhere else, and the
rest of the daemon records through :class:`Metrics` (a no-op when metrics are off)."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

from opentelemetry.metrics import CallbackOptions, Meter, NoOpMeterProvider, Observation
from prometheus_client import CollectorRegistry

LATENCY_BUCKETS_S = [0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 3600, 4 * 3600, 24 * 3600]


class Metrics:
    def __init__(self, meter: Meter) -> None:
        self.received = meter.create_counter(
            "enrichd.items.received", unit="1", description="Intake messages received, by handler"
        )
        self.completed = meter.create_counter(
            "enrichd.items.completed",
            unit="1",
            description="Result events, by handler, route, status and cached",
        )
        self.retries = meter.create_counter(
            "enrichd.retries", unit="1", description="Provider retries, by code"
        )
        self.dead_letters = meter.create_counter("enrichd.dlq", unit="1", description="DLQ entries, by code")
        self.tokens = meter.create_counter(
            "enrichd.tokens", unit="{token}", description="Tokens billed, by model, route and direction"
        )
        self.cost = meter.create_counter("enrichd.cost", unit="USD", description="Cost, by model and route")
        self.pipeline_steps = meter.create_counter(
            "enrichd.pipeline.steps",
            unit="1",
            description="Steps of finished pipeline items, by pipeline, step, route and status "
            "(ok, error, skipped)",
        )
        self.latency = meter.create_histogram(
            "enrichd.item.latency", unit="s", description="Intake to result, by route"
        )
        self.rate_limit_wait = meter.create_counter(
            "enrichd.ratelimit.wait", unit="s", description="Time spent waiting for the shared rate limit"
        )
        # Digests (CONTRACT §15): windows closed (outcome ok, error, empty), members, calls.
        self.digest_windows = meter.create_counter(
            "enrichd.digest.windows", unit="1", description="Digest windows closed, by digest and outcome"
        )
        self.digest_members = meter.create_counter(
            "enrichd.digest.members", unit="1", description="Members of the digest windows closed, by digest"
        )
        self.digest_calls = meter.create_counter(
            "enrichd.digest.calls", unit="1", description="Digest handler calls, by digest and cached"
        )
        self._gauges: dict[str, Callable[[], Iterable[tuple[float, dict[str, str]]]]] = {}
        # Called with every result event (e.g. today's tallies for `enrichd status`).
        self.listeners: list[Callable[[dict[str, Any]], None]] = []
        self._meter = meter

    def gauge(
        self, name: str, description: str, read: Callable[[], Iterable[tuple[float, dict[str, str]]]]
    ) -> None:
        """An observable gauge whose values come from ``read()`` at scrape time."""

        def callback(options: CallbackOptions) -> Iterable[Observation]:
            return [Observation(value, attrs) for value, attrs in read()]

        self._meter.create_observable_gauge(name, callbacks=[callback], description=description)

    def outcome(self, event: dict[str, Any], latency_s: float | None) -> None:
        self.outcomes([(event, latency_s)])

    def outcomes(self, observed: Iterable[tuple[dict[str, Any], float | None]]) -> None:
        """Record result events (with their intake-to-result latency). Counters are summed
        per attribute set first: one OTel ``add`` costs ~6 µs, and a batch publishes
        thousands of results at once."""
        sums: dict[tuple[Any, frozenset[tuple[str, str]]], float] = {}

        def add(counter: Any, value: float, attrs: dict[str, str]) -> None:
            key = (counter, frozenset(attrs.items()))
            sums[key] = sums.get(key, 0) + value

        for event, latency_s in observed:
            route = event["route"]
            cached = bool(event.get("cached"))
            attrs = {
                "handler": event["handler"],
                "route": route,
                "status": event["status"],
                "cached": "true" if cached else "false",
            }
            add(self.completed, 1, attrs)
            for listener in self.listeners:
                listener(event)
            if event["status"] == "error" and event.get("error"):
                add(self.dead_letters, 1, {"handler": event["handler"], "code": event["error"]["code"]})
            usage = event.get("usage") or {}
            if event.get("steps") is not None:  # a pipeline's end: its steps were counted as they ran
                self._pipeline(event, add)
                if latency_s is not None:
                    self.latency.record(latency_s, {"route": "pipeline"})
                continue
            if not cached and event.get("model"):
                self._spend(event, usage, add)
            if latency_s is not None:
                self.latency.record(latency_s, {"route": route})
        for (counter, frozen), value in sums.items():
            counter.add(value, dict(frozen))

    def _spend(
        self, event: dict[str, Any], usage: dict[str, Any], add: Callable[[Any, float, dict[str, str]], None]
    ) -> None:
        model_attrs = {"model": event["model"], "route": event["route"]}
        for direction in ("input", "output"):
            count = usage.get(f"{direction}_tokens")
            if count:
                add(self.tokens, count, {**model_attrs, "direction": direction})
        if event.get("cost_usd"):
            add(self.cost, event["cost_usd"], model_attrs)

    def _pipeline(self, event: dict[str, Any], add: Callable[[Any, float, dict[str, str]], None]) -> None:
        pipeline = str(event["handler"])
        for step in event.get("steps") or ():
            attrs = {"pipeline": pipeline, "step": str(step.get("handler")), "route": str(step.get("route"))}
            add(self.pipeline_steps, 1, {**attrs, "status": str(step.get("status", "ok"))})
        for name in event.get("skipped") or ():
            add(
                self.pipeline_steps,
                1,
                {"pipeline": pipeline, "step": str(name), "route": "-", "status": "skipped"},
            )


class BufferView(Protocol):
    @property
    def count(self) -> int: ...

    @property
    def oldest(self) -> datetime | None: ...


class BatcherView(Protocol):
    """What the state gauges read from the batcher (its last observations)."""

    @property
    def last_buffers(self) -> Mapping[str, BufferView]: ...

    @property
    def batches_by_status(self) -> Mapping[str, int]: ...


def register_state_gauges(metrics: Metrics, batcher: BatcherView, inflight: Callable[[], int]) -> None:
    """Buffers (items, oldest age), batches in flight by status and intake items in flight,
    read at scrape time."""

    def buffers() -> list[tuple[float, dict[str, str]]]:
        return [
            (float(st.count), {"buffer": subject.rsplit(".", 1)[-1]})
            for subject, st in batcher.last_buffers.items()
        ]

    def oldest() -> list[tuple[float, dict[str, str]]]:
        now = datetime.now(UTC)
        return [
            ((now - st.oldest).total_seconds(), {"buffer": subject.rsplit(".", 1)[-1]})
            for subject, st in batcher.last_buffers.items()
            if st.oldest is not None
        ]

    def batches() -> list[tuple[float, dict[str, str]]]:
        return [(float(n), {"status": status}) for status, n in batcher.batches_by_status.items()]

    metrics.gauge("enrichd.buffer.items", "Items waiting in each batch buffer", buffers)
    metrics.gauge("enrichd.buffer.oldest_age", "Age in seconds of the oldest buffered item", oldest)
    metrics.gauge("enrichd.batches.in_flight", "Provider batches in flight, by status", batches)
    metrics.gauge(
        "enrichd.items.in_flight",
        "Intake items being processed by this replica",
        lambda: [(float(inflight()), {})],
    )


def register_digest_gauges(
    metrics: Metrics, windows: Callable[[], Mapping[str, tuple[datetime, datetime]]]
) -> None:
    """Seconds until each digest's open window ends (negative: overdue, e.g. a backlog
    being run or a window waiting for budget), read at scrape time."""

    def closes_in() -> list[tuple[float, dict[str, str]]]:
        now = datetime.now(UTC)
        return [((end - now).total_seconds(), {"digest": name}) for name, (_, end) in windows().items()]

    metrics.gauge("enrichd.digest.closes_in", "Seconds until the digest's open window ends", closes_in)


def otlp_configured(signal: str) -> bool:
    """Whether the standard variables point ``signal`` ("metrics", "traces") at an OTLP
    endpoint: ``OTEL_EXPORTER_OTLP_ENDPOINT`` or ``OTEL_EXPORTER_OTLP_<SIGNAL>_ENDPOINT``."""
    import os

    specific = f"OTEL_EXPORTER_OTLP_{signal.upper()}_ENDPOINT"
    return bool(os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get(specific))


def build(
    prometheus: bool, service_name: str = "enrichd", *, otlp: bool | None = None
) -> tuple[Metrics, CollectorRegistry | None, Any]:
    """Metrics for one daemon: (metrics, the registry ``/metrics`` serves or None, the
    provider to shut down). ``prometheus``: serve them on ``/metrics``; ``otlp`` (default:
    when ``OTEL_EXPORTER_OTLP_*`` is set): also push them over OTLP/HTTP."""
    otlp = otlp_configured("metrics") if otlp is None else otlp
    if not prometheus and not otlp:
        return Metrics(NoOpMeterProvider().get_meter("enrichd")), None, None

    from opentelemetry.exporter.prometheus import PrometheusMetricReader
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.metrics.export import MetricReader
    from opentelemetry.sdk.metrics.view import ExplicitBucketHistogramAggregation, View
    from opentelemetry.sdk.resources import Resource

    registry = CollectorRegistry() if prometheus else None
    readers: list[MetricReader] = []
    if registry is not None:
        readers.append(PrometheusMetricReader(registry=registry))
    if otlp:
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
        from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader

        readers.append(PeriodicExportingMetricReader(OTLPMetricExporter()))
    provider = MeterProvider(
        resource=Resource.create({"service.name": service_name}),
        metric_readers=readers,
        views=[
            View(
                instrument_name="enrichd.item.latency",
                aggregation=ExplicitBucketHistogramAggregation(LATENCY_BUCKETS_S),
            )
        ],
    )
    return Metrics(provider.get_meter("enrichd")), registry, provider
