"""The batch path: flush buffers into provider batches, follow them, publish results.

Loops (named tasks owned by the daemon):
* ``flush``: watches the buffer stream; when the pure policy says a buffer is due it
  takes the buffered messages, writes the flush (items + record) to JetStream, and only
  then acks them.
* ``poll``: advances every active batch record this replica owns (or whose owner's
  lease expired): submit → poll → publish results. Every step is safe to repeat after a
  crash; docs/durability.md walks through each crash point.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from handlers import HandlerSpec
from service import failpoints
from service.aio import reraise_if_cancelled
from service.core.batch_outcomes import Action, ActionCollector, Fail, Ok, Retry, failed_batch_actions
from service.contract.subjects import Subjects
from service.core import batch_faults, fastjson
from service.core.batchfile import LineReader, custom_id, encode_line, to_jsonl
from service.core.batching import BatchPolicy, BufferState, flush_reason, take, until_next_check
from service.core.budget import seconds_until_next_day
from service.core.cost import Price, Usage, cost_usd, price_for
from service.core.errors import BadItemError, EnrichError, ErrorInfo, ProviderError
from service.core.events import (
    Outcome,
    dlq_entry,
    fitted_entry,
    iso,
    result_event,
    result_msg_id,
    stored_answer,
)
from service.core.items import item_from_object
from service.core.tokens import estimate_request_tokens
from service.observability import telemetry, tracing
from service.observability.alerts import Alerter
from service.observability.telemetry import Metrics
from service.providers.openai_batch import BatchInfo, OpenAIBatchProvider
from service.sinks.events import INTAKE_SEQ_HEADER, EventSink, Redactor, dumps, keep_second_answer
from service.state.batches import ACTIVE_STATES, BatchRecord, BatchStore, StaleRecordError, seq_ranges
from service.state.budget import BudgetExhaustedError, Ledger
from service.state.results import ResultStore, StoredResult

log = logging.getLogger("enrichd.batch")
# subject, payload, headers
Message = tuple[str, bytes, dict[str, str]]


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
        max_message_bytes: int = 1024 * 1024 - 16 * 1024,
        give_up_after_s: float = 3600.0,
    ) -> None:
        self.js = js
        self.subjects = subjects
        self.store = store
        self.results = results
        self.sink = sink
        self.redact = redact
        self.provider = provider
        self.registry = registry
        self.policy = policy
        self.poll_interval_s = poll_interval_s
        self.max_attempts = max_attempts
        self.max_enqueued_tokens = max_enqueued_tokens
        self.prices = prices
        self.batch_discount = batch_discount
        self.instance_id = instance_id
        self.consumer = consumer
        self.lease_s = lease_s
        self.results_chunk = results_chunk
        self.flush_ack_wait_s = flush_ack_wait_s
        self.max_tokens_param = max_tokens_param
        self.max_message_bytes = max_message_bytes  # the server's max_payload, less headers
        self.give_up_after_s = give_up_after_s
        self._wake = asyncio.Event()
        self._avg_bytes = 2048.0
        self._rng = random.Random()
        self._subs: dict[str, Any] = {}
        self._closing = False
        self.ledger: Ledger | None = None
        self.budget_recheck_s = 60.0
        self._blocked_until: dict[str, float] = {}
        # (handler, item id) of the items in this replica's flushes not yet published:
        # later messages with the same key wait for the answer instead of paying again.
        self._inflight_keys: dict[tuple[str, str], str] = {}
        # The copies held back meanwhile, unacked (kept alive with in_progress), by key:
        # answered from the result store as soon as the first copy's flush is published.
        self._held: dict[tuple[str, str], list[HeldCopy]] = {}
        self._held_seqs: dict[str, set[int]] = {}  # by buffer subject
        self._empty_fetches: dict[str, int] = {}  # due by the stream, nothing to fetch
        self._advancing: set[str] = set()  # flush ids this replica is submitting or following
        self.metrics: Metrics = telemetry.build(False)[0]
        self.alerts: Alerter | None = None
        self.tracer: trace.Tracer = trace.NoOpTracer()
        self.last_buffers: dict[str, BufferState] = {}
        self.batches_by_status: dict[str, int] = {}

    def request_stop(self) -> None:
        """Let the loops end at their next step. Cancellation alone is not enough: on
        Python 3.11 ``asyncio.wait_for`` (used inside nats-py) can swallow a cancel."""
        self._closing = True
        self._wake.set()

    def wake(self) -> None:
        """Something was buffered: re-check thresholds now."""
        self._wake.set()

    # -- flushing ------------------------------------------------------------------------

    async def buffer_states(self) -> dict[str, BufferState]:
        stream = self.subjects.stream("BUFFER")
        info = await self.js.stream_info(stream, subjects_filter=self.subjects.buffer_filter)
        states: dict[str, BufferState] = {}
        for subject, count in (info.state.subjects or {}).items():
            held = self._held_seqs.get(subject, set())
            count -= len(held)  # copies this replica holds back wait for an answer, not a flush
            if count <= 0:
                continue
            oldest = None
            try:
                seq = info.state.first_seq or 1
                for _ in range(1 + min(len(held), 50)):
                    first = await self.js.get_msg(stream, seq=seq, next=True, subject=subject)
                    oldest = first.time
                    if first.seq not in held:
                        break
                    seq = first.seq + 1
            except Exception:  # noqa: BLE001 - a message flushed meanwhile; age unknown this round
                oldest = None
            states[subject] = BufferState(count=count, bytes=int(count * self._avg_bytes), oldest=oldest)
        self.last_buffers = states
        return states

    async def flush_loop(self) -> None:
        while not self._closing:
            reraise_if_cancelled()
            delay = 5.0
            try:
                now = datetime.now(UTC)
                for subject, state in (await self.buffer_states()).items():
                    reason = flush_reason(self.policy, state, now)
                    if reason is not None and self._blocked_until.get(subject, 0.0) > time.monotonic():
                        continue  # waiting for the budget
                    if reason is not None:
                        log.log(
                            logging.DEBUG if self._empty_fetches.get(subject) else logging.INFO,
                            "flushing buffer",
                            extra={"buffer": subject, "reason": reason, "items": state.count},
                        )
                        await self.flush(subject)
                        delay = 0.0
                    else:
                        delay = min(delay, until_next_check(self.policy, state, now))
                await self._release_ready()
                if self._held:
                    await self._keep_held_alive()
                    delay = min(delay, self.flush_ack_wait_s / 3)
            except asyncio.CancelledError:
                raise
            except Exception:
                reraise_if_cancelled()
                log.exception("flush round failed")
                delay = 2.0
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=max(0.05, delay))
            except TimeoutError:
                pass

    async def _buffer_sub(self, subject: str) -> Any:
        sub = self._subs.get(subject)
        if sub is None:
            token = subject.rsplit(".", 1)[-1]
            durable = f"{self.consumer}_buf_{token}"[:200]
            sub = await self.js.pull_subscribe(
                subject,
                durable=durable,
                stream=self.subjects.stream("BUFFER"),
                config=ConsumerConfig(
                    ack_policy=AckPolicy.EXPLICIT,
                    ack_wait=self.flush_ack_wait_s,
                    max_deliver=-1,
                    max_ack_pending=-1,
                ),
            )
            self._subs[subject] = sub
        return sub

    async def _fetch(self, subject: str, limit: int) -> list[Any]:
        sub = await self._buffer_sub(subject)
        msgs: list[Any] = []
        while len(msgs) < limit:
            try:
                batch = await sub.fetch(min(1000, limit - len(msgs)), timeout=0.3)
            except TimeoutError:
                break
            except Exception as exc:  # noqa: BLE001 - nats raises its own TimeoutError subclasses
                if "imeout" in type(exc).__name__:
                    break
                raise
            msgs.extend(batch)
            if not batch:
                break
        return msgs

    async def flush(self, subject: str) -> BatchRecord | None:
        """Move up to one batch worth of buffered items into a durable flush record."""
        with self.tracer.start_as_current_span("enrich.batch.flush", attributes={"enrichd.buffer": subject}):
            try:
                record = await self._flush(subject)
            finally:
                await self._release_quietly()  # copies of items that did not go into this flush
            if record is not None:
                trace.get_current_span().set_attributes(
                    {"enrichd.flush_id": record.flush_id, "enrichd.items": record.count}
                )
                # Submitted once _flush has returned: the fetched messages and their
                # decoded records are released before the flush is read back and uploaded.
                await self._advance(record)
            return record

    async def _flush(self, subject: str) -> BatchRecord | None:
        msgs = await self._fetch(subject, self.policy.max_items)
        if not msgs:
            # The stream counts messages no fetch gets now (held by another replica, or
            # NAKed with a delay): look again later, backing off, instead of spinning.
            empty = self._empty_fetches[subject] = self._empty_fetches.get(subject, 0) + 1
            wait = min(max(5.0, self.poll_interval_s), 0.25 * 2 ** min(empty, 8))
            self._blocked_until[subject] = time.monotonic() + wait
            return None
        self._empty_fetches.pop(subject, None)
        seqs = [m.metadata.sequence.stream for m in msgs]
        flush_id = f"f{min(seqs)}-{subject.rsplit('.', 1)[-1]}"[:120]
        existing = await self.store.get(flush_id)
        if existing is not None:
            # We crashed after writing this flush and before acking: ack what it holds.
            for m in msgs:
                await (m.ack() if existing.holds_seq(m.metadata.sequence.stream) else m.nak())
            return None
        msgs, records, encoded = await self._unique(msgs)
        if msgs:
            msgs, records = await self._answer_stored(msgs, records)
        if not msgs:
            return None  # everything fetched was answered from the store or is held back
        seqs = [m.metadata.sequence.stream for m in msgs]
        stored = [encoded[r["cid"]][0] for r in records]
        sizes = [encoded[r["cid"]][1] for r in records]
        tokens = [encoded[r["cid"]][2] for r in records]
        del encoded
        self._avg_bytes = 0.8 * self._avg_bytes + 0.2 * (sum(sizes) / len(sizes))
        n = await self._within_budget(records, tokens, self._fit(sizes, tokens))
        keep, later = msgs[:n], msgs[n:]
        kept = records[:n]
        first = records[0]
        try:
            if n == 0:
                raise BudgetExhaustedError("all", 0.0, 0.0)
            day, reserved = await self._reserve_budget(kept, tokens[:n])
        except BudgetExhaustedError as exc:
            for m in msgs:
                await m.nak()
            self._blocked_until[subject] = time.monotonic() + min(
                self.budget_recheck_s, seconds_until_next_day(datetime.now(UTC))
            )
            log.warning("buffer waits for the budget", extra={"buffer": subject, "reason": str(exc)})
            return None
        record = BatchRecord(
            flush_id=flush_id,
            endpoint=first["endpoint"],
            model=first["model"],
            provider="openai",
            state="prepared",
            created_at=time.time(),
            count=n,
            size_bytes=sum(sizes[:n]),
            tokens=sum(tokens[:n]),
            buffer_ranges=seq_ranges(seqs[:n]),
            owner=self.instance_id,
            lease_until=time.time() + self.lease_s,
            status_changed_at=time.time(),
            budget_day=day,
            reserved_usd=reserved,
        )
        await self.store.put_items(flush_id, stored[:n])
        await self.store.create(record)
        for r in kept:
            self._inflight_keys[(r["handler"], r["item"]["id"])] = flush_id
        failpoints.hit("after_flush_record")
        for m in keep:
            await m.ack()
        for m in later:
            await m.nak()
        log.info(
            "flush written",
            extra={"flush_id": flush_id, "items": n, "tokens": record.tokens, "left_in_buffer": len(later)},
        )
        return record

    async def _unique(
        self, msgs: list[Any]
    ) -> tuple[list[Any], list[dict[str, Any]], dict[str, tuple[bytes, int, int]]]:
        """Decode buffered records. The same intake message buffered twice is sent once.
        Another message with the same (handler, id) as one in this flush, or as one in a
        flush of this replica still in flight, is held back (unacked, :meth:`_hold`): once
        the first one's flush is published it is answered from the store (``cached``), so
        the provider is not paid twice for one item.

        Each record's request body is encoded as it is decoded (:func:`encode_for_flush`,
        by custom id) and dropped: decoded, the bodies of a whole flush would be most of
        the memory the flush holds."""
        records, unique, seen, keys = [], [], set(), set()
        encoded: dict[str, tuple[bytes, int, int]] = {}
        unbuildable: list[tuple[Any, dict[str, Any], EnrichError]] = []
        for m in msgs:
            r = fastjson.loads(m.data)
            r["cid"] = custom_id(r["handler"], r["item"]["id"], r["intake_seq"])
            if r["cid"] in seen:
                await m.ack()
                continue
            key = (r["handler"], r["item"]["id"])
            if key in keys or key in self._inflight_keys:
                await self._hold(key, m, r)
                continue
            if "body" not in r:
                try:
                    r["body"] = request_body(r, self.registry, self.max_tokens_param)
                except EnrichError as exc:  # the handler changed since the item was buffered
                    unbuildable.append((m, r, exc))
                    continue
            seen.add(r["cid"])
            keys.add(key)
            encoded[r["cid"]] = encode_for_flush(r)
            records.append(r)
            unique.append(m)
        if unbuildable:
            await self._end_unbuildable(unbuildable)
        return unique, records, encoded

    async def _end_unbuildable(self, failed: list[tuple[Any, dict[str, Any], EnrichError]]) -> None:
        """Buffered items whose request cannot be built any more (their handler was removed,
        or its prompt now names a field they lack) end with that error and a DLQ entry."""
        messages: list[Message] = []
        now = datetime.now(UTC)
        for _, r, exc in failed:
            data, handler = r["item"], r["handler"]
            outcome = Outcome(
                id=data["id"],
                handler=handler,
                route="batch",
                model=r.get("model"),
                received_at=datetime.fromisoformat(r["received_at"].replace("Z", "+00:00")),
                completed_at=now,
                error=exc.info(),
                metadata=data.get("metadata"),
                source=data.get("source"),
            )
            event = result_event(outcome)
            entry = dlq_entry(
                id=data["id"],
                handler=handler,
                item=data,
                raw=None,
                error=exc.info(),
                attempts=0,
                subject=self.subjects.intake_prefix + handler,
                failed_at=now,
            )
            seq = r.get("intake_seq")
            dlq_payload = fitted_entry(
                entry, lambda e: self.redact(dumps(e)).encode(), self.max_message_bytes
            )
            messages.append(
                (
                    self.subjects.dlq(handler),
                    dlq_payload,
                    {"Nats-Msg-Id": f"{data['id']}:{handler}:dlq:{seq}"},
                )
            )
            msg_id = result_msg_id(data["id"], handler, error_intake_seq=seq)
            messages.append(
                (self.subjects.out(handler), self.redact(dumps(event)).encode(), {"Nats-Msg-Id": msg_id})
            )
            self.metrics.outcome(event, None)
            log.warning(
                "item failed",
                extra={"item_id": data["id"], "handler": handler, "error_code": exc.code, "attempts": 0},
            )
        await self._acked(await self._send_nowait(messages), messages)
        for m, _, _ in failed:
            await m.ack()

    async def _hold(self, key: tuple[str, str], msg: Any, record: dict[str, Any]) -> None:
        """Hold a copy back until the first copy's answer is stored (:meth:`_release_ready`)."""
        if sum(len(seqs) for seqs in self._held_seqs.values()) >= MAX_HELD:
            await msg.nak(delay=self.poll_interval_s)  # too many held: the buffer keeps the rest
            return
        record.pop("body", None)  # only the answer's metadata is needed
        self._held.setdefault(key, []).append(HeldCopy(msg.subject, msg, record, time.monotonic()))
        self._held_seqs.setdefault(msg.subject, set()).add(msg.metadata.sequence.stream)

    async def _release_ready(self) -> None:
        """Answer the held copies whose first copy is no longer in flight in this replica:
        from the result store (``cached``, each with its own metadata); a copy whose
        first one got no stored answer (an error) goes back to the buffer for a flush."""
        ready = [key for key in self._held if key not in self._inflight_keys]
        if not ready:
            return
        copies = [copy for key in ready for copy in self._held.pop(key)]
        for copy in copies:
            self._held_seqs.get(copy.subject, set()).discard(copy.msg.metadata.sequence.stream)
        try:
            left, _ = await self._answer_stored([c.msg for c in copies], [c.record for c in copies])
            for m in left:
                await m.nak()
        except Exception:
            reraise_if_cancelled()
            for copy in copies:  # try again next round (a published answer is deduplicated)
                key = (copy.record["handler"], copy.record["item"]["id"])
                self._held.setdefault(key, []).append(copy)
                self._held_seqs.setdefault(copy.subject, set()).add(copy.msg.metadata.sequence.stream)
            raise
        if left:
            self._wake.set()

    async def _release_quietly(self) -> None:
        """:meth:`_release_ready`, its failure logged: the flush loop tries again."""
        try:
            await self._release_ready()
        except Exception:
            reraise_if_cancelled()
            log.exception("answering held copies failed; trying again")

    async def _keep_held_alive(self) -> None:
        """``in_progress`` for held copies, often enough that ``flush_ack_wait_s`` never
        hands them to another fetch while the first copy's batch runs (hours at times)."""
        now = time.monotonic()
        for copies in list(self._held.values()):
            for copy in copies:
                if now - copy.touched >= self.flush_ack_wait_s / 3:
                    await copy.msg.in_progress()
                    copy.touched = now

    async def _answer_stored(
        self, msgs: list[Any], records: list[dict[str, Any]]
    ) -> tuple[list[Any], list[dict[str, Any]]]:
        """Items whose answer is already stored are answered from the store and not sent:
        the original event again for a redelivery of the message that produced it, else a
        ``cached`` copy for the new message. Looked up many at a time."""
        found: list[StoredResult | None] = []
        for begin in range(0, len(records), 500):
            part = records[begin : begin + 500]
            found += await asyncio.gather(*(self.results.get(r["handler"], r["item"]["id"]) for r in part))
        if not any(found):
            return msgs, records
        keep_msgs, keep_records, answered, messages = [], [], [], []
        now = datetime.now(UTC)
        for m, r, stored in zip(msgs, records, found, strict=True):
            if stored is None:
                keep_msgs.append(m)
                keep_records.append(r)
                continue
            received = datetime.fromisoformat(r["received_at"].replace("Z", "+00:00"))
            event, msg_id, cached = stored_answer(
                stored.event,
                stored.intake_seq,
                intake_seq=r["intake_seq"],
                metadata=r["item"].get("metadata"),
                source=r["item"].get("source"),
                received_at=received,
                now=now,
            )
            if cached:
                self.metrics.outcome(event, (now - received).total_seconds())
            payload = self.redact(dumps(event)).encode()
            headers = {"Nats-Msg-Id": msg_id, INTAKE_SEQ_HEADER: str(r["intake_seq"])}
            messages.append((self.subjects.out(r["handler"]), payload, headers))
            answered.append(m)
        await self._acked(await self._send_nowait(messages), messages)
        for m in answered:
            await m.ack()
        log.info("answered from the result store at flush", extra={"items": len(answered)})
        return keep_msgs, keep_records

    def _fit(self, sizes: list[int], tokens: list[int]) -> int:
        """How many leading records fit one batch: provider limits, then enqueued tokens."""
        n = take([x + 8 for x in sizes], max_items=self.policy.max_items, max_bytes=self.policy.max_bytes)
        if not self.max_enqueued_tokens:
            return n
        total, fit = 0, 0
        for t in tokens[:n]:
            if fit and total + t > self.max_enqueued_tokens:
                break
            total += t
            fit += 1
        return fit

    def _ceiling_usd(self, record: dict[str, Any], prompt_tokens: int) -> float:
        """Upper bound of one request's batch cost: prompt + max output tokens."""
        spec = self.registry.get(record["handler"])
        max_out = 0 if spec is None or spec.is_embedding else spec.max_output_tokens
        price = price_for(record["model"], self.prices)
        usage = Usage(prompt_tokens, max_out)
        return cost_usd(usage, price, route="batch", batch_discount=self.batch_discount) or 0.0

    async def _within_budget(self, records: list[dict[str, Any]], tokens: list[int], n: int) -> int:
        """Cut the flush to what today's budget can still pay for (0: nothing fits)."""
        if self.ledger is None:
            return n
        left: dict[str, float | None] = {}
        for index in range(n):
            handler = records[index]["handler"]
            if handler not in left:
                left[handler] = await self.ledger.remaining(handler)
            room = left[handler]
            if room is None:
                continue
            cost = self._ceiling_usd(records[index], tokens[index])
            if cost > room:
                return index
            left[handler] = room - cost
        return n

    async def _reserve_budget(
        self, records: list[dict[str, Any]], tokens: list[int]
    ) -> tuple[str | None, float]:
        """Reserve the flush's cost at its upper bound (prompt + max output, batch price)."""
        if self.ledger is None:
            return None, 0.0
        total = 0.0
        by_handler: dict[str, float] = {}
        for record, prompt in zip(records, tokens, strict=True):
            spec = self.registry.get(record["handler"])
            max_out = 0 if spec is None or spec.is_embedding else spec.max_output_tokens
            price = price_for(record["model"], self.prices)
            usd = (
                cost_usd(Usage(prompt, max_out), price, route="batch", batch_discount=self.batch_discount)
                or 0.0
            )
            by_handler[record["handler"]] = by_handler.get(record["handler"], 0.0) + usd
            total += usd
        day: str | None = None
        done: list[tuple[str, float]] = []
        try:
            for handler, usd in by_handler.items():
                day = await self.ledger.reserve(handler, "batch", usd)
                done.append((handler, usd))
        except BudgetExhaustedError:
            for handler, usd in done:
                await self.ledger.correct(day or "", handler, "batch", -usd)
            raise
        return day, total

    # -- following batches ---------------------------------------------------------------

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
        now = time.time()
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
        active = {r.flush_id for r in records if r.state in ACTIVE_STATES}
        self._inflight_keys = {k: f for k, f in self._inflight_keys.items() if f in active}
        await self._release_quietly()  # e.g. a flush another replica took over and published
        for record in records:
            if self._closing:
                return
            if record.state not in ACTIVE_STATES:
                continue
            if record.owner != self.instance_id and record.lease_until > now:
                continue
            try:
                await self._advance(record)
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

    async def _save(self, record: BatchRecord) -> BatchRecord:
        record.owner = self.instance_id
        record.lease_until = time.time() + self.lease_s
        return await self.store.update(record)

    async def _advance(self, record: BatchRecord) -> None:
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
        if record.owner != self.instance_id:
            record = await self._save(record)  # adopt (CAS: only one replica wins)
            log.info("adopted batch", extra={"flush_id": record.flush_id, "batch_id": record.batch_id})
        elif record.lease_until - time.time() < self.lease_s / 2:
            record = await self._save(record)  # renew: a batch that waits hours keeps its owner
        if record.state == "finished" and record.end_error is not None:
            await self._publish_ending(record)  # ended for good: (re)publish from the checkpoint
            return
        step: batch_faults.Step = "submit" if record.state == "prepared" else "follow"
        try:
            if record.state == "prepared":
                await self._submit(record)
            elif record.state in ("submitted", "finished") and record.batch_id:
                if record.not_before > time.time():
                    return  # backing off after a permanent failure
                await self._follow(record)
        except _DownloadError as exc:
            await self._permanent_failure(record, exc.error, "download")
        except ProviderError as exc:
            if not batch_faults.is_permanent(exc.retryable):
                raise
            await self._permanent_failure(record, exc, step)

    async def enqueued_tokens(self, model: str, *, excluding: str) -> int:
        return sum(
            r.tokens
            for r in await self.store.all()
            if r.state == "submitted" and r.model == model and r.flush_id != excluding
        )

    async def _submit(self, record: BatchRecord) -> None:
        if record.not_before > time.time():
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
            if queued and queued + record.tokens > self.max_enqueued_tokens:
                if record.note != "waiting for enqueued tokens":
                    record.note = "waiting for enqueued tokens"
                    await self._save(record)
                return
        if record.submit_attempts > 0:
            found = await self._find(record)
            if found is not None:
                log.info(
                    "reconciled batch created before a crash",
                    extra={"flush_id": record.flush_id, "batch_id": found.id},
                )
                await self._mark_submitted(record, found)
                return
        # One item decoded at a time: the request lines are all that is kept.
        items = await self.store.iter_items(record.flush_id)
        data = to_jsonl(((it["cid"], it["body"]) for it in items), url=record.endpoint)
        del items
        record.submit_attempts += 1
        record = await self._save(record)  # the attempt is durable before anything is created
        create_error: ProviderError | None = None
        async with self._lease_kept(record) as lease:
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
            found = await self._find(record)
            if found is None and batch_faults.is_permanent(create_error.retryable):
                await self.provider.delete_file(file_id)
                raise create_error  # bounded in _permanent_failure
            if found is None:
                record.not_before = time.time() + min(600.0, 2.0 ** min(record.submit_attempts, 9))
                record.note = self.redact(f"create failed: {create_error.code}: {create_error.message}")
                await self._save(record)
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

    async def _find(self, record: BatchRecord) -> BatchInfo | None:
        """The batch created for this flush, if any: never one it had before (a lost or
        failed batch of the same flush is listed with the same tag)."""
        found = await self.provider.find(record.flush_id, created_after=record.created_at)
        if found is not None and found.id in record.previous_batch_ids:
            return None
        return found

    @contextlib.asynccontextmanager
    async def _lease_kept(self, record: BatchRecord) -> AsyncIterator[LeaseKeeper]:
        """Renew the record's lease every third of it while a long step runs (an upload
        of a large batch file can outlast it): a replica at work must not look dead to
        the others, or one would adopt the flush and submit it a second time."""
        keeper = LeaseKeeper()
        stop = asyncio.Event()

        async def renew() -> None:
            while not keeper.lost:
                try:
                    await asyncio.wait_for(stop.wait(), self.lease_s / 3)
                    return
                except TimeoutError:
                    pass
                try:
                    await self._save(record)
                except StaleRecordError:
                    keeper.lost = True
                except Exception:  # noqa: BLE001 - NATS trouble: try again next time
                    reraise_if_cancelled()
                    log.debug("lease renewal failed", exc_info=True)

        task = asyncio.create_task(renew(), name=f"lease-{record.flush_id}")
        try:
            yield keeper
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)

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
        _clear_fault(record)
        record.status_changed_at = time.time()
        await self._save(record)
        await self.sink.lifecycle("batch.submitted", self._event_body(record), msg_id=f"{info.id}:submitted")
        log.info(
            "batch submitted", extra={"flush_id": record.flush_id, "batch_id": info.id, "items": record.count}
        )

    async def _follow(self, record: BatchRecord) -> None:
        assert record.batch_id is not None
        info = await self.provider.retrieve(record.batch_id)
        failpoints.hit("while_polling")
        recovered = record.fault_step == "follow"
        if recovered:
            _clear_fault(record)
        if recovered or info.status != record.provider_status or info.request_counts != record.request_counts:
            if info.status != record.provider_status:
                record.status_changed_at = time.time()
            record.provider_status = info.status
            record.request_counts = info.request_counts
            record = await self._save(record)
        if info.terminal:
            await self._finish(record, info)

    async def _finish(self, record: BatchRecord, info: BatchInfo) -> None:
        # Request bodies are most of a flush's memory and only a retry sends one again:
        # read the items without them, then again with the retried ones' bodies if any.
        items = await self.store.items(record.flush_id, bodies=False)
        if info.status == "failed" and any(e.code == "token_limit_exceeded" for e in info.errors):
            await self._requeue_whole(record, info, "token_limit_exceeded")
            return
        if info.status == "failed":
            actions = failed_batch_actions(info, len(items))
        else:
            actions = await self._line_actions(info, items)
        retried = {index for index, action in enumerate(actions) if isinstance(action, Retry)}
        if retried:
            items = await self.store.items(record.flush_id, bodies=retried)
        record.state = "finished"
        _clear_fault(record)
        record = await self._save(record)
        await self._publish(record, info, items, actions)

    async def _requeue_whole(self, record: BatchRecord, info: BatchInfo, why: str) -> None:
        """The provider refused the whole batch for now: submit the same flush again later."""
        await self.sink.lifecycle(
            "batch.failed", {**self._event_body(record), "reason": why}, msg_id=f"{info.id}:failed"
        )
        record.previous_batch_ids.append(info.id)
        record.batch_id = None
        record.state = "prepared"
        record.submit_attempts = 0
        backoff = min(3600.0, self.poll_interval_s * 2 ** min(len(record.previous_batch_ids), 8))
        record.not_before = time.time() + backoff * (0.5 + self._rng.random() / 2)
        record.note = f"{why}: resubmitting after {backoff:.0f}s"
        await self._save(record)
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
            now=time.time(),
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
            await self._save(record)
            log.warning(
                "permanent provider error on a batch; backing off",
                extra={
                    "flush_id": record.flush_id,
                    "batch_id": record.batch_id,
                    "step": step,
                    "error_code": exc.code,
                    "failures": fault.count,
                    "retry_in_s": round(decision.retry_at - time.time(), 1),
                    "give_up_in_s": round(fault.since + self.give_up_after_s - time.time(), 1),
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
        now = time.time()
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
            "batch.failed", {**self._event_body(record), "reason": reason}, msg_id=f"{lost}:failed"
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
        _clear_fault(record)
        await self._save(record)
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
        _clear_fault(record)
        await self._save(record)
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
        await self._publish(record, info, items, actions, reason=error.code)

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

    # -- results -------------------------------------------------------------------------

    async def _publish(
        self,
        record: BatchRecord,
        info: BatchInfo,
        items: list[dict[str, Any]],
        actions: list[Action],
        *,
        reason: str | None = None,
    ) -> None:
        counts = {"ok": 0, "error": 0, "retried": 0}
        for action in actions:
            counts[
                "ok" if isinstance(action, Ok) else "error" if isinstance(action, Fail) else "retried"
            ] += 1
        start = record.published_upto
        # Chunk N+1 is built and sent while chunk N's acks come back; the checkpoint moves
        # past a chunk only once all its acks are in. A restart resends from the last
        # checkpoint, and every message it resends carries the same Nats-Msg-Id.
        previous: tuple[list[Any], list[Message], int] | None = None
        for begin in range(start, len(items), self.results_chunk):
            chunk = range(begin, min(begin + self.results_chunk, len(items)))
            pending: list[Message] = []
            observed: list[tuple[dict[str, Any], float | None]] = []
            for index in chunk:
                pending.extend(self._messages(record, items[index], actions[index], observed))
            self.metrics.outcomes(observed)
            futures = await self._send_nowait(pending)
            failpoints.hit("mid_publish")  # published, not yet checkpointed
            if previous is not None:
                await self._acked(previous[0], previous[1])
                record.published_upto = previous[2]
                record = await self._save(record)
            previous = (futures, pending, chunk.stop)
        if previous is not None:
            await self._acked(previous[0], previous[1])
            record.published_upto = previous[2]
            record = await self._save(record)
        if self.ledger is not None and record.budget_day and start == 0:
            await self._settle_budget(record, items, actions)
        record.state = "published"
        record.outcome = counts
        record = await self._save(record)
        for item in items:
            self._inflight_keys.pop((item["handler"], item["item"]["id"]), None)
        topic = {
            "completed": "batch.completed",
            "expired": "batch.expired",
            "cancelled": "batch.cancelled",
            "failed": "batch.failed",
        }.get(info.status, "batch.completed")
        body: dict[str, Any] = {**self._event_body(record), **counts}
        if reason is not None:
            body["reason"] = reason
        await self.sink.lifecycle(topic, body, msg_id=f"{info.id}:{info.status}")
        await self.store.drop_items(record.flush_id)
        if record.input_file_id:
            await self.provider.delete_file(record.input_file_id)
        log.info(
            "batch done",
            extra={"flush_id": record.flush_id, "batch_id": info.id, "status": info.status, **counts},
        )
        await self._release_quietly()  # copies of these items get their cached answers now

    async def _settle_budget(
        self, record: BatchRecord, items: list[dict[str, Any]], actions: list[Action]
    ) -> None:
        """Swap the flush's reservation for what the provider billed (lines that ran)."""
        assert self.ledger is not None and record.budget_day is not None
        price = price_for(record.model, self.prices)
        billed: dict[str, float] = {}
        for item, action in zip(items, actions, strict=True):
            usage = action.usage if isinstance(action, Ok | Fail) else Usage(0, 0)
            usd = cost_usd(usage, price, route="batch", batch_discount=self.batch_discount) or 0.0
            billed[item["handler"]] = billed.get(item["handler"], 0.0) + usd
        reserved_share = record.reserved_usd / max(1, len(items))
        for handler, usd in billed.items():
            count = sum(1 for it in items if it["handler"] == handler)
            await self.ledger.correct(record.budget_day, handler, "batch", usd - reserved_share * count)

    def _messages(
        self,
        record: BatchRecord,
        item: dict[str, Any],
        action: Action,
        observed: list[tuple[dict[str, Any], float | None]] | None = None,
    ) -> list[Message]:
        """The JetStream messages one item's action produces (result, DLQ, KV, buffer).
        The result event and its latency go to ``observed`` for the metrics (recorded a
        chunk at a time), or are recorded at once when it is None."""
        data = item["item"]
        handler = item["handler"]
        if isinstance(action, Retry):
            again = {
                **item,
                "batch_attempts": int(item.get("batch_attempts", 0)) + 1,
                "last_batch": record.batch_id,
            }
            token = self.subjects.buffer(record_token(record))
            msg_id = f"{handler}:{data['id']}:{item['intake_seq']}:b{again['batch_attempts']}"
            return [(token, dumps(again).encode(), {"Nats-Msg-Id": msg_id})]
        usage = action.usage
        price = price_for(record.model, self.prices)
        outcome = Outcome(
            id=data["id"],
            handler=handler,
            route="batch",
            model=record.model,
            received_at=datetime.fromisoformat(item["received_at"].replace("Z", "+00:00")),
            completed_at=datetime.now(UTC),
            batch_id=record.batch_id,
            attempts=int(item.get("batch_attempts", 0)) + 1,
            usage=usage,
            cost_usd=cost_usd(usage, price, route="batch", batch_discount=self.batch_discount),
            metadata=data.get("metadata"),
            source=data.get("source"),
            result=action.result if isinstance(action, Ok) else None,
            error=action.error if isinstance(action, Fail) else None,
        )
        event = result_event(outcome)
        latency_s = (outcome.completed_at - outcome.received_at).total_seconds()
        if observed is None:
            self.metrics.outcome(event, latency_s)
        else:
            observed.append((event, latency_s))
        if self.alerts is not None:
            self.alerts.outcome(ok=outcome.ok)
        if not outcome.ok or log.isEnabledFor(logging.DEBUG):
            log.log(
                logging.WARNING if not outcome.ok else logging.DEBUG,
                "item failed" if not outcome.ok else "item done",
                extra={
                    "item_id": data["id"],
                    "handler": handler,
                    "batch_id": record.batch_id,
                    "attempts": outcome.attempts,
                    "error_code": outcome.error.code if outcome.error else None,
                    "input_tokens": usage.input_tokens,
                    "output_tokens": usage.output_tokens,
                },
            )
        out: list[Message] = []
        event_json = dumps(event)
        if isinstance(action, Ok):
            subject, payload = self.results.put_message_json(
                handler, data["id"], event_json, intake_seq=item.get("intake_seq")
            )
            out.append((subject, payload, {}))
        else:
            assert isinstance(action, Fail)
            entry = dlq_entry(
                id=data["id"],
                handler=handler,
                item=data,
                raw=None,
                error=action.error,
                attempts=outcome.attempts,
                subject=self.subjects.intake_prefix + handler,
                failed_at=outcome.completed_at,
                last_provider_message=action.last_message,
            )
            msg_id = f"{data['id']}:{handler}:dlq:{item.get('intake_seq')}"
            payload = fitted_entry(entry, lambda e: self.redact(dumps(e)).encode(), self.max_message_bytes)
            out.append((self.subjects.dlq(handler), payload, {"Nats-Msg-Id": msg_id}))
        msg_id = result_msg_id(
            data["id"], handler, error_intake_seq=None if event["status"] == "ok" else item.get("intake_seq")
        )
        headers = {"Nats-Msg-Id": msg_id}
        if event["status"] == "ok":
            headers[INTAKE_SEQ_HEADER] = str(item.get("intake_seq"))
        if tracing.enabled(self.tracer):
            # The far side of the batch hop: continue the item's trace from its intake span.
            with self.tracer.start_as_current_span(
                "enrich.batch.result",
                context=tracing.from_traceparent(item.get("traceparent")),
                kind=SpanKind.PRODUCER,
                attributes=tracing.item_attributes(
                    data["id"], handler, batch_id=record.batch_id, status=event["status"], route="batch"
                ),
            ):
                tracing.inject(headers)
        out.append((self.subjects.out(handler), self.redact(event_json).encode(), headers))
        return out

    async def _send_nowait(self, messages: list[Message]) -> list[Any]:
        return [await self.js.publish_async(s, p, headers=h or None) for s, p, h in messages]

    async def _acked(self, futures: list[Any], messages: list[Message]) -> None:
        """Wait for the PubAcks of ``messages``; an ``ok`` event dropped as a duplicate of
        another intake message's answer is sent again (sinks.events.keep_second_answer)."""
        results = await asyncio.gather(*futures, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise RuntimeError(f"{len(failures)} of {len(futures)} publishes failed: {failures[0]!r}")
        for ack, (subject, payload, headers) in zip(results, messages, strict=True):
            if headers and INTAKE_SEQ_HEADER in headers and getattr(ack, "duplicate", False):
                await keep_second_answer(self.js, self.subjects, ack, subject, payload, headers)

    def _event_body(self, record: BatchRecord) -> dict[str, Any]:
        return record.event_body(iso(datetime.now(UTC)))

    async def close(self) -> None:
        """Release the buffer subscriptions (a pending pull would stall the NATS drain)."""
        held, self._held = self._held, {}
        self._held_seqs = {}
        for copies in held.values():
            for copy in copies:  # back to the buffer now rather than after flush_ack_wait_s
                try:
                    await copy.msg.nak()
                except Exception:  # noqa: BLE001 - redelivered after ack_wait anyway
                    log.debug("nak of a held copy failed", exc_info=True)
        subs, self._subs = self._subs, {}
        for sub in subs.values():
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection may already be closing
                log.debug("unsubscribe failed", exc_info=True)

    # -- operator actions ------------------------------------------------------------------

    async def cancel(self, batch_id: str) -> BatchInfo:
        return await self.provider.cancel(batch_id)


def request_body(
    record: dict[str, Any], registry: dict[str, HandlerSpec], max_tokens_param: str
) -> dict[str, Any]:
    """The provider request of a buffered item, built at flush from the item (buffer
    records do not carry it: it would hold the item's text twice). Raises EnrichError when
    the handler is gone or its prompt names a field the item lacks."""
    spec = registry.get(record["handler"])
    if spec is None:
        raise BadItemError("unknown_handler", f"no handler named {record['handler']!r} any more")
    item = item_from_object(record["item"], record["handler"])
    return spec.build_body(item, max_tokens_param=max_tokens_param)


def encode_for_flush(record: dict[str, Any]) -> tuple[bytes, int, int]:
    """A decoded buffer record's line in the flush object, the size of its request line
    and its estimated prompt tokens; its request body is dropped from ``record``."""
    body = record["body"]
    line = dumps(record).encode() + b"\n"
    size = len(encode_line(record["cid"], record["endpoint"], body))
    tokens = estimate_request_tokens(body)
    del record["body"]
    return line, size, tokens


MAX_HELD = 20_000  # copies held back in memory at most; beyond, they wait in the buffer


@dataclass
class HeldCopy:
    """A buffered copy of an item in flight, held unacked until its answer is stored."""

    subject: str
    msg: Any
    record: dict[str, Any]
    touched: float  # monotonic time of the last delivery or in_progress


class _DownloadError(Exception):
    """A permanent failure reading a finished batch's output or error file."""

    def __init__(self, error: ProviderError) -> None:
        super().__init__(str(error))
        self.error = error


def _clear_fault(record: BatchRecord) -> None:
    record.fault_step = record.fault_code = None
    record.fault_since, record.fault_count = 0.0, 0


@dataclass
class LeaseKeeper:
    lost: bool = False  # another replica took the record over


def record_token(record: BatchRecord) -> str:
    from service.core.routing import BufferKey

    return BufferKey(record.provider, record.endpoint, record.model).subject_token()
