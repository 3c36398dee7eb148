"""The batch record state machine: prepared -> submitted -> finished -> published, one
step at a time per flush in this replica. A batch the provider refused is requeued, a
lost one resubmitted, and a permanent provider failure backs off, alerts once and, when
it has lasted ``give_up_after_s``, ends the flush's items (service.core.batch_faults)."""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from handlers import HandlerSpec
from service import failpoints
from service.aio import reraise_if_cancelled
from service.batch.lease import Leases
from service.batch.ports import Promotions
from service.batch.publisher import Publisher
from service.batch.records import clear_fault, event_body
from service.batch.submit import Submitter
from service.core import batch_faults
from service.core.batch_info import BatchInfo
from service.core.batch_outcomes import (
    Action,
    ActionCollector,
    Fail,
    Retry,
    failed_batch_actions,
    line_numbers,
)
from service.core.batchfile import LineReader
from service.core.cost import Usage
from service.core.errors import ErrorInfo, ProviderError
from service.core.events import iso
from service.providers.openai_batch import OpenAIBatchProvider
from service.sinks.events import EventSink, Redactor
from service.state.batches import BatchRecord, BatchStore

log = logging.getLogger("enrichd.batch")


def requeue_backoff_s(poll_interval_s: float, previous_batches: int) -> float:
    """How long a flush the provider refused waits before it is submitted again (before
    jitter: the wait is drawn between half of it and all of it)."""
    return min(3600.0, poll_interval_s * 2.0 ** min(previous_batches, 8))


class Lifecycle:
    def __init__(
        self,
        *,
        store: BatchStore,
        provider: OpenAIBatchProvider,
        leases: Leases,
        submitter: Submitter,
        publisher: Publisher,
        sink: EventSink,
        redact: Redactor,
        registry: dict[str, HandlerSpec],
        instance_id: str,
        poll_interval_s: float,
        max_attempts: int,
        give_up_after_s: float,
        clock: Callable[[], float] = time.time,
        promotions: Promotions | None = None,
        rng: random.Random | None = None,
    ) -> None:
        self.store = store
        self.provider = provider
        self.leases = leases
        self.submitter = submitter
        self.publisher = publisher
        self.sink = sink
        self.redact = redact
        self.registry = registry
        self.instance_id = instance_id
        self.poll_interval_s = poll_interval_s
        self.max_attempts = max_attempts
        self.give_up_after_s = give_up_after_s
        self.clock = clock
        self.promotions = promotions
        self.rng = rng or random.Random()
        self._advancing: set[str] = set()  # flush ids this replica is submitting or following

    async def advance(self, record: BatchRecord) -> None:
        # The flush loop submits a new flush while the poll loop follows every record: one
        # step at a time per flush in this replica, or a poll round that sees the record
        # "prepared" while batches.create is still in flight would create a second batch
        # (other replicas are kept out by the owner's lease).
        if record.flush_id in self._advancing:
            return
        self._advancing.add(record.flush_id)
        try:
            await self._advance_now(record)
        finally:
            self._advancing.discard(record.flush_id)

    async def _advance_now(self, record: BatchRecord) -> None:
        record = await self.leases.claim(record)  # adopt (CAS: one replica wins) or renew
        if record.state == "finished" and record.end_error is not None:
            await self._publish_ending(record)  # ended for good: (re)publish from the checkpoint
            return
        step: batch_faults.Step = "submit" if record.state == "prepared" else "follow"
        try:
            if record.state == "prepared":
                await self.submitter.submit(record)
            elif record.state in ("submitted", "finished") and record.batch_id:
                if record.not_before > self.clock():
                    return  # backing off after a permanent failure
                await self._follow(record)
        except _DownloadError as exc:
            await self._permanent_failure(record, exc.error, "download")
        except ProviderError as exc:
            if not batch_faults.is_permanent(exc.retryable):
                raise
            await self._permanent_failure(record, exc, step)

    async def _follow(self, record: BatchRecord) -> None:
        assert record.batch_id is not None
        if (
            self.promotions is not None
            and record.promote_at is not None
            and record.promote_at <= self.clock()
        ):
            record = await self._promote_due(record, self.promotions)
        assert record.batch_id is not None
        info = await self.provider.retrieve(record.batch_id)
        failpoints.hit("while_polling")
        recovered = record.fault_step == "follow"
        if recovered:
            clear_fault(record)
        if recovered or info.status != record.provider_status or info.request_counts != record.request_counts:
            if info.status != record.provider_status:
                record.status_changed_at = self.clock()
            record.provider_status = info.status
            record.request_counts = info.request_counts
            record = await self.leases.save(record)
        if info.terminal:
            await self._finish(record, info)

    async def _promote_due(self, record: BatchRecord, promotions: Promotions) -> BatchRecord:
        """Items of this batch whose deadline is near are answered on another route now
        (CONTRACT §11); the batch's answers for them will not be published."""
        items = await self.store.items(record.flush_id, bodies=False)
        waiting = [it for it in items if it["item"].get("deadline")]
        due = [it for it in waiting if promotions.due(it)]
        for it in due:
            promotions.wanted(it)
        record.promote_at = promotions.promote_at(it for it in waiting if not promotions.due(it))
        log.info(
            "promoting items of a batch in flight", extra={"flush_id": record.flush_id, "items": len(due)}
        )
        return await self.leases.save(record)

    async def _finish(self, record: BatchRecord, info: BatchInfo) -> None:
        # Request bodies are most of a flush's memory and only a retry sends one again:
        # read the items without them, then again with the retried ones' bodies if any.
        items = await self.store.items(record.flush_id, bodies=False)
        if info.status == "failed" and any(e.code == "token_limit_exceeded" for e in info.errors):
            await self._requeue_whole(record, info, "token_limit_exceeded")
            return
        if info.status == "failed":
            actions = failed_batch_actions(info, len(items), line_numbers(items))
        else:
            actions = await self._line_actions(info, items)
        retried = {index for index, action in enumerate(actions) if isinstance(action, Retry)}
        if retried:
            items = await self.store.items(record.flush_id, bodies=retried)
        record.state = "finished"
        clear_fault(record)
        record = await self.leases.save(record)
        await self.publisher.publish(record, info, items, actions)

    async def _requeue_whole(self, record: BatchRecord, info: BatchInfo, why: str) -> None:
        """The provider refused the whole batch for now: submit the same flush again later."""
        await self.sink.lifecycle(
            "batch.failed", {**event_body(record, self.clock()), "reason": why}, msg_id=f"{info.id}:failed"
        )
        record.previous_batch_ids.append(info.id)
        record.batch_id = None
        record.state = "prepared"
        record.submit_attempts = 0
        backoff = requeue_backoff_s(self.poll_interval_s, len(record.previous_batch_ids))
        record.not_before = self.clock() + backoff * (0.5 + self.rng.random() / 2)
        record.note = f"{why}: resubmitting after {backoff:.0f}s"
        await self.leases.save(record)
        log.warning(
            "batch refused by provider; will resubmit",
            extra={"flush_id": record.flush_id, "batch_id": info.id, "reason": why},
        )

    # -- permanent provider failures (service.core.batch_faults) ------------------------

    async def _permanent_failure(
        self, record: BatchRecord, exc: ProviderError, step: batch_faults.Step
    ) -> None:
        """Alert at once, back off, and once the failure has lasted ``give_up_after_s``
        end the flush: resubmit it (a lost batch or output file) or end its items."""
        current = None
        if record.fault_step is not None and record.fault_code is not None:
            current = batch_faults.Fault(
                record.fault_step, record.fault_code, record.fault_since, record.fault_count
            )
        decision = batch_faults.on_permanent_failure(
            step,
            exc.code,
            exc.message,
            current=current,
            now=self.clock(),
            give_up_after_s=self.give_up_after_s,
            base_s=self.poll_interval_s,
            lost_batches=record.lost_batches,
            max_lost=self.max_attempts,
        )
        if isinstance(decision, batch_faults.Retry):
            fault = decision.fault
            if decision.first:
                await self._alert_fault(record, exc, step, fault)
            record.fault_step, record.fault_code = fault.step, fault.code
            record.fault_since, record.fault_count = fault.since, fault.count
            record.not_before = decision.retry_at
            record.note = self.redact(f"{step}: {exc.code}: {exc.message}")
            await self.leases.save(record)
            log.warning(
                "permanent provider error on a batch; backing off",
                extra={
                    "flush_id": record.flush_id,
                    "batch_id": record.batch_id,
                    "step": step,
                    "error_code": exc.code,
                    "failures": fault.count,
                    "retry_in_s": round(decision.retry_at - self.clock(), 1),
                    "give_up_in_s": round(fault.since + self.give_up_after_s - self.clock(), 1),
                },
            )
        elif isinstance(decision, batch_faults.Resubmit):
            await self._resubmit_lost(record, decision.reason)
        else:
            error = ErrorInfo(decision.code, self.redact(decision.message), decision.retryable)
            await self._end_with_error(record, error)

    async def _alert_fault(
        self, record: BatchRecord, exc: ProviderError, step: str, fault: batch_faults.Fault
    ) -> None:
        now = self.clock()
        message = self.redact(
            f"flush {record.flush_id}: {exc.code} while {step} ({exc.message}); "
            f"its items end in {self.give_up_after_s:.0f}s unless it clears"
        )
        body = {
            "kind": "batch_provider_error",
            "key": record.flush_id,
            "message": message,
            "at": iso(datetime.fromtimestamp(now, UTC)),
            "instance": self.instance_id,
            "flush_id": record.flush_id,
            "batch_id": record.batch_id,
            "step": step,
            "error_code": exc.code,
            "give_up_after_s": self.give_up_after_s,
        }
        log.warning("alert: %s", message, extra={"alert": "batch_provider_error", "key": record.flush_id})
        msg_id = f"alert:batch_provider_error:{record.flush_id}:{step}:{exc.code}:{fault.since:.0f}"
        try:
            await self.sink.lifecycle("alert", body, msg_id=msg_id)
        except Exception:  # noqa: BLE001 - the log line above still tells
            reraise_if_cancelled()
            log.exception("could not publish an alert", extra={"alert": "batch_provider_error"})

    async def _resubmit_lost(self, record: BatchRecord, reason: str) -> None:
        """The provider lost the batch (or its output): the same flush becomes a new batch."""
        lost = record.batch_id
        assert lost is not None
        await self.sink.lifecycle(
            "batch.failed", {**event_body(record, self.clock()), "reason": reason}, msg_id=f"{lost}:failed"
        )
        old_input = record.input_file_id
        record.previous_batch_ids.append(lost)
        record.batch_id = None
        record.input_file_id = None
        record.provider_status = None
        record.request_counts = {}
        record.state = "prepared"
        record.submit_attempts = 0
        record.lost_batches += 1
        record.not_before = 0.0
        record.note = f"{reason}: resubmitting (batch {lost} lost)"
        clear_fault(record)
        await self.leases.save(record)
        log.warning(
            "batch lost by the provider; resubmitting the flush",
            extra={"flush_id": record.flush_id, "batch_id": lost, "reason": reason},
        )
        if old_input:
            await self.provider.delete_file(old_input)

    async def _end_with_error(self, record: BatchRecord, error: ErrorInfo) -> None:
        """Every item of the flush ends with ``error`` (result event + DLQ). Durable first:
        a restart publishes the same endings from the checkpoint."""
        record.end_error = error.to_dict()
        record.state = "finished"
        record.note = f"ended: {error.code}"
        clear_fault(record)
        await self.leases.save(record)
        log.error(
            "gave up on a batch; ending its items",
            extra={"flush_id": record.flush_id, "batch_id": record.batch_id, "error_code": error.code},
        )
        await self._publish_ending(record)

    async def _publish_ending(self, record: BatchRecord) -> None:
        assert record.end_error is not None
        error = ErrorInfo(**record.end_error)
        items = await self.store.items(record.flush_id, bodies=False)
        actions: list[Action] = [Fail(error, Usage(0, 0), error.message)] * len(items)
        info = BatchInfo(
            id=record.batch_id or record.flush_id,
            status="failed",
            created_at=0,
            output_file_id=None,
            error_file_id=None,
            request_counts=record.request_counts,
        )
        await self.publisher.publish(record, info, items, actions, reason=error.code)

    async def _line_actions(self, info: BatchInfo, items: list[dict[str, Any]]) -> list[Action]:
        """Stream the error file, then the output file, into per-item actions."""
        collector = ActionCollector(items, self.registry, status=info.status, max_attempts=self.max_attempts)
        for file_id in (info.error_file_id, info.output_file_id):
            if not file_id:
                continue
            reader = LineReader()
            try:
                async for chunk in self.provider.download(file_id):
                    collector.add(reader.feed(chunk))
            except ProviderError as exc:
                if not batch_faults.is_permanent(exc.retryable):
                    raise
                raise _DownloadError(exc) from None
            collector.add(reader.finish())
        return collector.result()


class _DownloadError(Exception):
    """A permanent failure reading a finished batch's output or error file."""

    def __init__(self, error: ProviderError) -> None:
        super().__init__(str(error))
        self.error = error
