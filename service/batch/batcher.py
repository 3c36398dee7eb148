"""The batch path: flush buffers into provider batches, follow them, publish results.

``Batcher`` composes the parts, each with one job, and runs the two loops (named tasks
owned by the daemon):

* ``flush`` (:class:`~service.batch.flusher.Flusher`): watches the buffer stream
  (:class:`~service.state.buffers.Buffers`); when the pure policy says a buffer is due it
  takes the buffered messages, plans the flush (``service.core.flush_plan``), reserves its
  spend (:mod:`~service.batch.spend`), writes the flush (items + record) to JetStream, and
  only then acks them.
* ``poll`` (here): advances every active batch record this replica owns (or whose
  owner's lease expired, :mod:`~service.batch.lease`) through the state machine
  (:mod:`~service.batch.lifecycle`): submit (:mod:`~service.batch.submit`) -> poll ->
  publish results (:mod:`~service.batch.publisher`). Every step is safe to repeat after a
  crash; docs/durability.md walks through each crash point.

Time is passed in, in three kinds: ``clock`` (wall, epoch seconds: ages, backoffs and
leases, compared across replicas, so on the host's real clock), ``monotonic`` (pauses
within this process) and ``calendar`` (the daemon's clock, a ``datetime``: which budget
day it is and the ``completed_at`` stamps on events). The real ones unless given.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext
from opentelemetry import trace

from handlers import HandlerSpec
from service.aio import reraise_if_cancelled
from service.batch.flusher import Flusher
from service.batch.held import HeldCopies
from service.batch.lease import Leases, may_advance
from service.batch.lifecycle import Lifecycle
from service.batch.ports import Promotions
from service.batch.publisher import Publisher
from service.batch.spend import Spend
from service.batch.submit import Submitter
from service.contract.subjects import Subjects
from service.core.batch_info import BatchInfo
from service.core.batching import BatchPolicy, BufferState
from service.core.cost import Price
from service.core.errors import ProviderError
from service.core.events import DEFAULT_MAX_MESSAGE_BYTES
from service.core.packing import PackLimits
from service.core.pipelines import PipelineSpec
from service.observability import telemetry
from service.observability.alerts import Alerter
from service.observability.telemetry import Metrics
from service.providers.openai_batch import OpenAIBatchProvider
from service.sinks.events import EventSink, Redactor
from service.state.batches import ACTIVE_STATES, BatchRecord, BatchStore, StaleRecordError
from service.state.budget import Ledger
from service.state.buffers import Buffers
from service.state.results import ResultStore

log = logging.getLogger("enrichd.batch")


class Batcher:
    def __init__(
        self,
        *,
        js: JetStreamContext,
        subjects: Subjects,
        store: BatchStore,
        results: ResultStore,
        sink: EventSink,
        redact: Redactor,
        provider: OpenAIBatchProvider,
        registry: dict[str, HandlerSpec],
        policy: BatchPolicy,
        poll_interval_s: float,
        max_attempts: int,
        max_enqueued_tokens: int | None,
        prices: dict[str, Price],
        batch_discount: float,
        instance_id: str,
        consumer: str,
        lease_s: float = 120.0,
        results_chunk: int = 1000,
        flush_ack_wait_s: float = 120.0,
        max_tokens_param: str = "max_completion_tokens",
        pack_limits: PackLimits | None = None,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        give_up_after_s: float = 3600.0,
        metrics: Metrics | None = None,
        alerts: Alerter | None = None,
        tracer: trace.Tracer | None = None,
        ledger: Ledger | None = None,
        budget_recheck_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        calendar: Callable[[], datetime] | None = None,
        promotions: Promotions | None = None,
        pipelines: Mapping[str, PipelineSpec] | None = None,
    ) -> None:
        if calendar is None:
            calendar = lambda: datetime.fromtimestamp(clock(), UTC)  # noqa: E731
        self.store = store
        self.redact = redact
        self.provider = provider
        self.instance_id = instance_id
        self.poll_interval_s = poll_interval_s
        self.clock = clock
        self.alerts = alerts
        tracer = tracer or trace.NoOpTracer()
        self._wake = asyncio.Event()
        self._closing = False
        self.batches_by_status: dict[str, int] = {}
        self.buffers = Buffers(js, subjects, consumer=consumer, ack_wait_s=flush_ack_wait_s)
        self.leases = Leases(store, instance_id=instance_id, lease_s=lease_s, clock=clock)
        self.spend = Spend(
            ledger=ledger,
            registry=registry,
            prices=prices,
            batch_discount=batch_discount,
            recheck_s=budget_recheck_s,
        )
        self.held = HeldCopies(
            poll_interval_s=poll_interval_s, ack_wait_s=flush_ack_wait_s, monotonic=monotonic
        )
        self.publisher = Publisher(
            js=js,
            subjects=subjects,
            store=store,
            results=results,
            sink=sink,
            redact=redact,
            provider=provider,
            leases=self.leases,
            spend=self.spend,
            prices=prices,
            batch_discount=batch_discount,
            metrics=metrics or telemetry.build(False)[0],
            alerts=alerts,
            tracer=tracer,
            held=self.held,
            wake=self._wake.set,
            results_chunk=results_chunk,
            max_message_bytes=max_message_bytes,
            calendar=calendar,
            registry=registry,
            promotions=promotions,
            pipelines=pipelines,
        )
        self.submitter = Submitter(
            store=store,
            provider=provider,
            leases=self.leases,
            sink=sink,
            redact=redact,
            max_enqueued_tokens=max_enqueued_tokens,
            tracer=tracer,
            clock=clock,
        )
        self.lifecycle = Lifecycle(
            store=store,
            provider=provider,
            leases=self.leases,
            submitter=self.submitter,
            publisher=self.publisher,
            sink=sink,
            redact=redact,
            registry=registry,
            instance_id=instance_id,
            poll_interval_s=poll_interval_s,
            max_attempts=max_attempts,
            give_up_after_s=give_up_after_s,
            clock=clock,
            promotions=promotions,
        )
        self.flusher = Flusher(
            buffers=self.buffers,
            store=store,
            subjects=subjects,
            held=self.held,
            publisher=self.publisher,
            spend=self.spend,
            advance=self.lifecycle.advance,
            wake=self._wake,
            policy=policy,
            registry=registry,
            instance_id=instance_id,
            poll_interval_s=poll_interval_s,
            max_enqueued_tokens=max_enqueued_tokens,
            max_tokens_param=max_tokens_param,
            pack_limits=pack_limits or PackLimits(),
            lease_s=lease_s,
            tracer=tracer,
            clock=clock,
            monotonic=monotonic,
            calendar=calendar,
            promotions=promotions,
        )

    @property
    def last_buffers(self) -> dict[str, BufferState]:
        """Each buffer's state as the flush loop last read it (for the gauges)."""
        return self.flusher.last_buffers

    def request_stop(self) -> None:
        """Let the loops end at their next step. Cancellation alone is not enough: on
        Python 3.11 ``asyncio.wait_for`` (used inside nats-py) can swallow a cancel."""
        self._closing = True
        self.flusher.request_stop()

    def wake(self) -> None:
        """Something was buffered: re-check thresholds now."""
        self._wake.set()

    async def flush_loop(self) -> None:
        await self.flusher.flush_loop()

    async def flush(self, subject: str) -> BatchRecord | None:
        """Move up to one batch worth of buffered items into a durable flush record."""
        return await self.flusher.flush(subject)

    async def poll_loop(self) -> None:
        while not self._closing:
            reraise_if_cancelled()
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception:
                reraise_if_cancelled()
                log.exception("poll round failed")
            await asyncio.sleep(self.poll_interval_s)

    async def poll_once(self) -> None:
        now = self.clock()
        records = await self.store.all()
        by_status: dict[str, int] = {}
        for r in records:
            if r.state in ACTIVE_STATES:
                key = r.provider_status or r.state
                by_status[key] = by_status.get(key, 0) + 1
        self.batches_by_status = by_status
        if self.alerts is not None:  # the records are at hand: judge batch ages here
            self.alerts.batch_ages(
                (r.batch_id, r.created_at) for r in records if r.batch_id and r.state == "submitted"
            )
        self.held.keep_flushes({r.flush_id for r in records if r.state in ACTIVE_STATES})
        await self.publisher.release_quietly()  # e.g. a flush another replica took over and published
        for record in records:
            if self._closing:
                return
            if record.state not in ACTIVE_STATES:
                continue
            if not may_advance(record, instance_id=self.instance_id, now=now):
                continue
            try:
                await self.lifecycle.advance(record)
            except StaleRecordError:
                log.info("batch record changed under us; skipping", extra={"flush_id": record.flush_id})
            except ProviderError as exc:
                log.warning(
                    "provider call failed while following a batch",
                    extra={
                        "flush_id": record.flush_id,
                        "error_code": exc.code,
                        "provider_message": exc.message,
                    },
                )

    async def close(self) -> None:
        """Held copies back to the buffer, and the buffer subscriptions released (a
        pending pull would stall the NATS drain)."""
        await self.held.let_go()
        await self.buffers.close()

    # -- operator actions ------------------------------------------------------------------

    async def cancel(self, batch_id: str) -> BatchInfo:
        return await self.provider.cancel(batch_id)

    async def on_cancel_request(self, request: dict[str, Any]) -> dict[str, Any]:
        """The operator's ``control.cancel`` request: ask the provider to cancel the
        batch; its items end when the provider reports it cancelled."""
        batch_id = str(request.get("batch_id", ""))
        try:
            info = await self.cancel(batch_id)
        except Exception as exc:  # noqa: BLE001 - the operator gets the reason
            return {"batch_id": batch_id, "error": self.redact(str(exc))}
        log.info("batch cancel requested", extra={"batch_id": batch_id, "status": info.status})
        return {"batch_id": info.id, "status": info.status}
