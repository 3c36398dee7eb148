"""The composition root: builds NATS (embedded or remote), the provider (real or the
built-in emulator), the pipeline and the sources, owns the tasks, signals and the
shutdown order. Nothing else in the daemon starts or stops anything."""

from __future__ import annotations

import asyncio
import logging
import signal
import time
from collections.abc import Coroutine
from typing import Any

from faststream.nats import NatsBroker
from faststream.nats.opentelemetry import NatsTelemetryMiddleware

from service import wiring
from service.aio import stage
from service.batch.batcher import Batcher
from service.broker.connect import (
    ConnectionMonitor,
    broker_security,
    ensure_embedded_auth,
    ensure_state_dir,
    with_embedded_auth,
)
from service.broker.embedded import EmbeddedNats
from service.contract.subjects import Subjects
from service.core.events import iso
from service.core.redact import Redactor, redact_url, servers
from service.digests.runner import Digests
from service.observability import telemetry, tracing
from service.observability.alerts import Alerter
from service.observability.health import HealthServer
from service.observability.sdnotify import Notifier
from service.pipeline.process import Clock, Pipeline, utcnow
from service.providers.openai_sync import OpenAISyncProvider
from service.settings import Settings
from service.sinks.events import EventSink
from service.sources.folders.source import FolderSource
from service.sources.nats_intake import NatsIntake
from service.sources.nats_requests import NatsRequests
from service.state.results import ResultStore
from service.state.stats import DailyStats
from service.state.streams import ensure_streams, open_kv

log = logging.getLogger("enrichd")


class DaemonFailedError(RuntimeError):
    """The daemon stopped because it cannot work any more (e.g. NATS closed for good);
    ``enrichd run`` exits non-zero so that systemd restarts it."""


class Daemon:
    """One enrichd process. ``await start()``, then ``await stop()`` (or :meth:`run`)."""

    def __init__(self, settings: Settings, *, clock: Clock | None = None, span_exporter: Any = None) -> None:
        self.settings = settings
        # Traces: on with OTEL_EXPORTER_OTLP_* or an exporter passed in (service/tracing.py).
        self.tracer, self._tracer_provider = tracing.build(exporter=span_exporter)
        self.clock: Clock = clock or utcnow
        self.subjects = Subjects(settings.nats.subject_prefix)
        self.redact = Redactor(settings.secrets())
        self.nats_url = settings.nats.url or ""
        self.provider_url: str | None = settings.openai.base_url
        self._embedded: EmbeddedNats | None = None
        self._emulator: Any = None
        self._broker: NatsBroker | None = None
        self._provider: OpenAISyncProvider | None = None
        self._source: NatsIntake | None = None
        self._sink: EventSink | None = None
        self._requests: NatsRequests | None = None
        self._health: HealthServer | None = None
        self._meter_provider: Any = None
        self.folders: FolderSource | None = None
        self.pipeline: Pipeline | None = None
        self.batcher: Batcher | None = None
        self.alerts: Alerter | None = None
        self.stats: DailyStats | None = None
        self.digests: Digests | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self.notifier = Notifier()
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()
        self._stopped = False
        self._failed: str | None = None
        self._conn: ConnectionMonitor | None = None

    async def start(self) -> None:
        started = time.monotonic()
        s = self.settings
        ensure_state_dir(s.state_dir)
        self.metrics, registry, self._meter_provider = telemetry.build(bool(s.telemetry.metrics_port))
        if s.telemetry.metrics_port:
            self._health = HealthServer(
                s.telemetry.metrics_host, s.telemetry.metrics_port, self.is_ready, registry
            )
            await self._health.start()
        nats_cfg = s.nats
        if s.nats.embedded:
            # Not open to every local user: the server requires credentials generated
            # once into the state dir (0600), which the command line reads too.
            auth = ensure_embedded_auth(s.state_dir)
            nats_cfg = with_embedded_auth(s.nats, auth)
            self._embedded = EmbeddedNats(s.state_dir / "nats", port=s.nats.embedded_port, auth=auth)
            self.nats_url = await self._embedded.start()
        started_provider = await wiring.start_provider(s)
        self._provider, self.provider_url = started_provider.client, started_provider.url
        self._emulator = started_provider.emulator
        self._conn = ConnectionMonitor(self.nats_url, self._fail)
        broker = NatsBroker(
            servers(self.nats_url),
            security=broker_security(nats_cfg),
            **self._conn.broker_kwargs(),
            graceful_timeout=s.shutdown.grace_s,
            drain_timeout=5,
            logger=logging.getLogger("faststream"),
            name="enrichd",
            middlewares=(
                [NatsTelemetryMiddleware(tracer_provider=self._tracer_provider)]
                if self._tracer_provider is not None
                else []
            ),
        )
        self._broker = broker
        self._conn.connecting()
        await broker.connect()
        self._conn.connected_now()
        js = broker.config.connection_state.stream
        await ensure_streams(
            js,
            self.subjects,
            replicas=s.nats.stream_replicas,
            result_dedup_window_s=s.nats.result_dedup_window_s,
        )
        kv = await open_kv(
            js, self.subjects.results_bucket, ttl_s=s.results.ttl_s, replicas=s.nats.stream_replicas
        )
        assert self._provider is not None
        max_message, max_item = wiring.item_limits(s, broker.config.connection_state.connection.max_payload)
        sink = self._sink = EventSink(js, self.subjects, self.redact, max_bytes=max_message)
        results = ResultStore(kv, self.subjects.results_bucket)
        self.alerts = wiring.alerter(s, sink)
        ledger = await wiring.open_ledger(
            js, s, self.subjects, clock=self.clock, on_exceeded=self._budget_exceeded
        )
        marks = await wiring.open_marks(js, s, self.subjects)
        self.pipeline = Pipeline(
            wiring.pipeline_config(
                s,
                max_item_bytes=max_item,
                max_message_bytes=max_message,
                intake_prefix=self.subjects.intake_prefix,
            ),
            provider=self._provider,
            store=results,
            sink=sink,
            clock=self.clock,
            limiter=(limiter := await wiring.open_limiter(js, s, self.subjects)),
            ledger=ledger,
            metrics=self.metrics,
            alerts=self.alerts,
            tracer=self.tracer,
            on_buffered=self._wake_batcher,
            budget_recheck_s=s.budget.recheck_s,
            marks=marks,
        )
        self.digests = await wiring.build_digests(
            js, s, self.subjects, self.pipeline, self._provider, limiter, sink, self.metrics, self.alerts
        )
        self.stats = await wiring.open_stats(js, s, self.subjects, clock=self.clock)
        self.metrics.listeners.append(self.stats.record)
        self.batcher = await wiring.build_batcher(
            js,
            s,
            self.subjects,
            provider=self._provider,
            results=results,
            sink=sink,
            redact=self.redact,
            metrics=self.metrics,
            alerts=self.alerts,
            tracer=self.tracer,
            ledger=ledger,
            clock=self.clock,
            max_message_bytes=max_message,
            promotions=self.pipeline.promoter,
        )
        telemetry.register_state_gauges(
            self.metrics, self.batcher, lambda: self._source.inflight if self._source else 0
        )
        self._source = NatsIntake(
            self.subjects,
            self.pipeline,
            durable=s.nats.consumer,
            ack_wait_s=s.nats.ack_wait_s,
            max_deliver=s.nats.max_deliver,
        )
        self._requests = NatsRequests(
            broker,
            self.subjects,
            self.pipeline,
            self.redact,
            durable=s.nats.consumer,
            sync_workers=s.openai.max_concurrency,
        )
        self._requests.register()
        broker.subscriber(
            self.subjects.control("cancel"), queue=f"{s.nats.consumer}-control", include_in_schema=False
        )(self.batcher.on_cancel_request)
        await broker.start()
        await self._source.start(js)
        self._spawn(self._source.pull_loop(), "intake")
        self._spawn(self._source.heartbeats(), "intake-heartbeat")
        if s.folders.enabled:
            self.folders = FolderSource(
                s, self.subjects, broker.connection, self.redact, supervise=self._spawn
            )
            await self.folders.start()
        self._spawn(self.batcher.flush_loop(), "flush")
        self._spawn(self.batcher.poll_loop(), "poll")
        if self.notifier.watchdog_interval_s is not None:  # run by systemd with WatchdogSec
            self._spawn(self.notifier.watchdog(self.is_ready), "watchdog")
        self._spawn(self.stats.loop(), "stats")
        if self.pipeline.promoter is not None:
            self._spawn(self.pipeline.promoter.loop(), "promote")
        if self.digests is not None:
            self._spawn(self.digests.loop(), "digests")
        if self._embedded is not None:
            self._spawn(self._embedded.watch(self._fail), "embedded-nats")
        self.ready.set()
        self.notifier.ready(f"consuming {self.subjects.intake_filter}")
        log.info(
            "enrichd ready",
            extra={
                "nats": redact_url(self.nats_url),
                "nats_embedded": s.nats.embedded,
                "provider": self.provider_url or "https://api.openai.com/v1",
                "emulator": self._emulator is not None,
                "handlers": sorted(s.registry),
                "startup_s": round(time.monotonic() - started, 3),
            },
        )

    def _wake_batcher(self) -> None:
        """The pipeline buffered items: the flush loop looks at its buffers now."""
        if self.batcher is not None:
            self.batcher.wake()

    async def _budget_exceeded(self, day: str, scope: str, cap_usd: float, spent_usd: float) -> None:
        """Published once per budget day and scope, by whichever replica hits it first."""
        assert self._sink is not None
        await self._sink.budget_exceeded(
            day, scope, cap_usd, spent_usd, at=iso(self.clock()), instance=self.settings.instance
        )

    def is_ready(self) -> bool:
        """Ready (``/readyz`` 200, ``WATCHDOG=1`` sent) only while consuming with NATS
        connected: not while it reconnects, not once it is closed."""
        broker = self._broker
        connection = broker.connection if broker is not None else None
        return (
            self.ready.is_set()
            and not self._stop.is_set()
            and connection is not None
            and bool(connection.is_connected)
            and self._conn is not None
            and self._conn.connected
        )

    def request_stop(self) -> None:
        self._stop.set()

    async def _stop_intake(self) -> None:
        """Stop pulling (the "intake" loop) and release the consumer; in-flight items go
        on, kept ours by the heartbeats until they are drained."""
        for task in self._tasks:
            if task.get_name() == "intake":
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self._source is not None:
            await self._source.unsubscribe()

    def _spawn(self, work: Coroutine[Any, Any, None], name: str) -> None:
        """Run a long-lived loop under the daemon's supervision: a loop that ends (with an
        error or not) while the daemon is not stopping is logged with its traceback, and
        the daemon stops and exits non-zero (systemd restarts it) rather than running on
        without it."""
        task = asyncio.create_task(work, name=name)
        self._tasks.append(task)
        task.add_done_callback(self._loop_ended)

    def _loop_ended(self, task: asyncio.Task[None]) -> None:
        if self._stop.is_set() or task.cancelled():
            return
        error = task.exception()
        if error is not None:
            log.error(f"background loop died: {task.get_name()}", exc_info=error)
        self._fail(f"the {task.get_name()} loop {'died' if error else 'ended'}")

    def _fail(self, reason: str) -> None:
        """Stop, and have ``run`` raise :class:`DaemonFailedError` (a non-zero exit)."""
        if self._failed is None and not self._stop.is_set():
            self._failed = reason
            log.error(f"stopping: {reason}")
        self._stop.set()

    async def run(self) -> None:
        """Start, wait for SIGTERM/SIGINT, stop. A signal during start-up (say while NATS
        cannot be reached) stops at once. Raises :class:`DaemonFailedError` when it stopped
        because it could not go on."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        stopped = asyncio.create_task(self._stop.wait(), name="stop-signal")
        starting = asyncio.create_task(self.start(), name="start")
        try:
            await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if starting.done():
                starting.result()  # start-up errors propagate
                await stopped
            else:
                starting.cancel()
                await asyncio.gather(starting, return_exceptions=True)
                log.info("stopped during start-up")
        finally:
            stopped.cancel()
            await self.stop()
        if self._failed is not None:
            raise DaemonFailedError(self._failed)

    async def _close_clients(self) -> None:
        """Last shutdown stages: provider client, emulator, embedded server, endpoints."""
        if self._provider is not None:
            await stage("provider client closed", self._provider.close(), 5)
        if self._emulator is not None:
            await stage("emulator stopped", self._emulator.stop(), 5)
        if self._embedded is not None:
            await stage("embedded nats-server stopped", self._embedded.stop(), 15)
        if self._health is not None:
            await stage("health endpoint stopped", self._health.stop(), 5)
        # Off the event loop: shutting down exports what is left over HTTP (OTLP).
        if self._meter_provider is not None:
            await stage("metrics exported", asyncio.to_thread(self._meter_provider.shutdown), 10)
        if self._tracer_provider is not None:
            await stage("traces exported", asyncio.to_thread(self._tracer_provider.shutdown), 10)

    async def _close_state(self) -> None:
        """Shutdown stages after the loops stopped: what is held in memory is written."""
        if self.pipeline is not None and self.pipeline.promoter is not None:
            await stage("promotions stopped", self.pipeline.promoter.close(), 5)
        if self.batcher is not None:
            await stage("buffer subscriptions closed", self.batcher.close(), 5)
        if self.stats is not None:
            await stage("today's tallies saved", self.stats.save(), 5)
        if self.alerts is not None:
            await stage("alerts sent", self.alerts.drain(), 5)

    async def stop(self) -> None:
        """Shut down in stages, each logged and bounded: stop intake, let in-flight items
        finish within ``shutdown.grace_s`` (the rest stay unacked and are redelivered),
        stop the batch loops (their state is already durable), then close connections."""
        if self._stopped:
            return
        self._stopped = True
        self._stop.set()
        self.notifier.stopping()
        grace = self.settings.shutdown.grace_s
        log.info("stopping", extra={"grace_s": grace})
        left = 0
        if self.folders is not None:
            await stage("folder watching stopped", self.folders.stop(), 10)
        if self._source is not None:
            await stage("intake stopped", self._stop_intake(), 5)
            for sub in list(self._broker.subscribers if self._broker else []):
                await stage("subscriber stopped", sub.stop(), 5)
            left = await self._source.drain(grace)
            log.info("in-flight items drained", extra={"unfinished": left})
        if self.batcher is not None:
            self.batcher.request_stop()
        for task in self._tasks:
            task.cancel()
        await stage("background loops stopped", asyncio.gather(*self._tasks, return_exceptions=True), 5)
        self._tasks = []
        await self._close_state()
        if self._conn is not None:
            self._conn.stopping = True
        if self._broker is not None:
            await stage("nats connection drained", self._broker.stop(), 10)
            self._broker = None
        await self._close_clients()
        counters = self.pipeline.counters.summary() if self.pipeline else ""
        batch = self.batcher.publisher.tally if self.batcher else {}
        batch_line = " ".join(f"{k}={batch.get(k, 0)}" for k in ("ok", "error", "cached", "retried"))
        log.info(f"stopped: {counters} unfinished={left} batch: {batch_line}")
