"""Exactly-once submission of a prepared flush: the attempt is durable before anything
is created, a batch created before a crash is found again by its tag, a create that
failed is retried with a backoff, and a batch created after another replica took the
flush over is cancelled. docs/durability.md walks through each crash point."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from opentelemetry import trace

from service import failpoints
from service.batch.lease import Leases
from service.batch.records import clear_fault, event_body
from service.core import batch_faults
from service.core.batch_info import BatchInfo
from service.core.batchfile import to_jsonl
from service.core.errors import ProviderError
from service.providers.openai_batch import OpenAIBatchProvider
from service.sinks.events import EventSink, Redactor
from service.state.batches import BatchRecord, BatchStore, StaleRecordError

log = logging.getLogger("enrichd.batch")

WAITING_FOR_TOKENS = "waiting for enqueued tokens"


def create_backoff_s(submit_attempts: int) -> float:
    """How long a flush whose batch create failed (retryably) waits before the next try."""
    return min(600.0, 2.0 ** min(submit_attempts, 9))


def over_enqueued_tokens(queued: int, tokens: int, max_enqueued_tokens: int | None) -> bool:
    """The provider's enqueued-token limit would be passed: wait for other batches first
    (a flush alone over the limit is sent anyway: it was cut to fit at flush)."""
    return bool(max_enqueued_tokens) and bool(queued) and queued + tokens > (max_enqueued_tokens or 0)


class Submitter:
    def __init__(
        self,
        *,
        store: BatchStore,
        provider: OpenAIBatchProvider,
        leases: Leases,
        sink: EventSink,
        redact: Redactor,
        max_enqueued_tokens: int | None,
        tracer: trace.Tracer,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.provider = provider
        self.leases = leases
        self.sink = sink
        self.redact = redact
        self.max_enqueued_tokens = max_enqueued_tokens
        self.tracer = tracer
        self.clock = clock

    async def enqueued_tokens(self, model: str, *, excluding: str) -> int:
        return sum(
            r.tokens
            for r in await self.store.all()
            if r.state == "submitted" and r.model == model and r.flush_id != excluding
        )

    async def submit(self, record: BatchRecord) -> None:
        """Create the flush's provider batch, unless it is backing off."""
        if record.not_before > self.clock():
            return
        with self.tracer.start_as_current_span(
            "enrich.batch.submit",
            attributes={"enrichd.flush_id": record.flush_id, "enrichd.items": record.count},
        ):
            await self._submit_now(record)
            if record.batch_id:
                trace.get_current_span().set_attribute("enrichd.batch_id", record.batch_id)

    async def _submit_now(self, record: BatchRecord) -> None:
        if self.max_enqueued_tokens:
            queued = await self.enqueued_tokens(record.model, excluding=record.flush_id)
            if over_enqueued_tokens(queued, record.tokens, self.max_enqueued_tokens):
                if record.note != WAITING_FOR_TOKENS:
                    record.note = WAITING_FOR_TOKENS
                    await self.leases.save(record)
                return
        if record.submit_attempts > 0:
            found = await self.find(record)
            if found is not None:
                log.info(
                    "reconciled batch created before a crash",
                    extra={"flush_id": record.flush_id, "batch_id": found.id},
                )
                await self._mark_submitted(record, found)
                return
        # One item decoded at a time: the request lines are all that is kept. A pack is
        # one line, carried by its first member under the pack's custom id.
        items = await self.store.iter_items(record.flush_id)
        data = to_jsonl(
            ((it.get("pack") or it["cid"], it["body"]) for it in items if "body" in it), url=record.endpoint
        )
        del items
        record.submit_attempts += 1
        record = await self.leases.save(record)  # the attempt is durable before anything is created
        create_error: ProviderError | None = None
        async with self.leases.kept(record) as lease:
            # An upload error propagates (the poll loop logs it and tries again later).
            file_id = await self.provider.upload(f"{record.flush_id}.jsonl", data)
            failpoints.hit("after_upload")
            if lease.lost:  # another replica took the flush over: the batch is its to make
                await self.provider.delete_file(file_id)
                raise StaleRecordError(record.flush_id)
            try:
                info: BatchInfo | None = await self.provider.create(
                    input_file_id=file_id, endpoint=record.endpoint, flush_id=record.flush_id
                )
            except ProviderError as exc:
                create_error, info = exc, None
        if info is None:
            assert create_error is not None
            found = await self.find(record)
            if found is None and batch_faults.is_permanent(create_error.retryable):
                await self.provider.delete_file(file_id)
                raise create_error  # bounded in Lifecycle.permanent_failure
            if found is None:
                record.not_before = self.clock() + create_backoff_s(record.submit_attempts)
                record.note = self.redact(f"create failed: {create_error.code}: {create_error.message}")
                await self.leases.save(record)
                log.warning(
                    "batch create failed; will retry",
                    extra={"flush_id": record.flush_id, "error_code": create_error.code},
                )
                return
            info = found
        if lease.lost:
            await self._created_without_the_record(record, info)
            return
        failpoints.hit("after_create")
        record.input_file_id = file_id
        await self._mark_submitted(record, info)

    async def find(self, record: BatchRecord) -> BatchInfo | None:
        """The batch created for this flush, if any: never one it had before (a lost or
        failed batch of the same flush is listed with the same tag)."""
        found = await self.provider.find(record.flush_id, created_after=record.created_at)
        if found is not None and found.id in record.previous_batch_ids:
            return None
        return found

    async def _created_without_the_record(self, record: BatchRecord, info: BatchInfo) -> None:
        """Our batch was created after another replica took the flush over (its lease ran
        out, e.g. NATS was unreachable for longer than ``lease_s``). Unless the record now
        names our batch (the other replica found it), it is a duplicate: cancel it."""
        current = await self.store.get(record.flush_id)
        if current is not None and current.batch_id == info.id:
            return
        log.warning(
            "cancelling a duplicate batch: another replica took the flush over",
            extra={"flush_id": record.flush_id, "batch_id": info.id},
        )
        await self.provider.cancel(info.id)

    async def _mark_submitted(self, record: BatchRecord, info: BatchInfo) -> None:
        record.batch_id = info.id
        record.state = "submitted"
        record.provider_status = info.status
        record.note = None
        clear_fault(record)
        record.status_changed_at = self.clock()
        await self.leases.save(record)
        await self.sink.lifecycle(
            "batch.submitted", event_body(record, self.clock()), msg_id=f"{info.id}:submitted"
        )
        log.info(
            "batch submitted", extra={"flush_id": record.flush_id, "batch_id": info.id, "items": record.count}
        )
