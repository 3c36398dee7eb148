"""The flush loop: read the buffer states, let the pure policy say which buffer is due,
and take a flush from it: fetch, plan (service.core.flush_plan), write the flush (items +
record) to JetStream, and only then ack what went into it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from handlers import HandlerSpec
from service import failpoints
from service.aio import reraise_if_cancelled
from service.batch.held import HeldCopies
from service.batch.ports import Promotions
from service.batch.publisher import Message, Publisher
from service.batch.spend import Spend
from service.contract.subjects import Subjects
from service.core import endings, fastjson
from service.core.batching import BatchPolicy, BufferState, flush_reason, until_next_check
from service.core.errors import EnrichError
from service.core.events import Outcome
from service.core.flush_plan import (
    Encoded,
    budget_wait_s,
    empty_fetch_wait_s,
    fit,
    flush_id,
    pack_lines,
    plan_fetch,
)
from service.core.packing import PackLimits
from service.sinks.events import dumps
from service.state.batches import BatchRecord, BatchStore, seq_ranges
from service.state.budget import BudgetExhaustedError
from service.state.buffers import Buffers
from service.state.promoted import promotion_key

# A buffered item being promoted comes back to the flush after this many seconds (by then
# it is marked, and taken out of its buffer).
PROMOTION_RECHECK_S = 5.0

log = logging.getLogger("enrichd.batch")


class Flusher:
    def __init__(
        self,
        *,
        buffers: Buffers,
        store: BatchStore,
        subjects: Subjects,
        held: HeldCopies,
        publisher: Publisher,
        spend: Spend,
        advance: Callable[[BatchRecord], Awaitable[None]],
        wake: asyncio.Event,
        policy: BatchPolicy,
        registry: dict[str, HandlerSpec],
        instance_id: str,
        poll_interval_s: float,
        max_enqueued_tokens: int | None,
        max_tokens_param: str,
        lease_s: float,
        pack_limits: PackLimits | None = None,
        tracer: trace.Tracer,
        clock: Callable[[], float] = time.time,
        monotonic: Callable[[], float] = time.monotonic,
        calendar: Callable[[], datetime] = lambda: datetime.now(UTC),
        promotions: Promotions | None = None,
    ) -> None:
        self.promotions = promotions
        self.buffers = buffers
        self.store = store
        self.subjects = subjects
        self.held = held
        self.publisher = publisher
        self.spend = spend
        self.advance = advance  # submit the flush just written
        self._wake = wake
        self.policy = policy
        self.registry = registry
        self.instance_id = instance_id
        self.poll_interval_s = poll_interval_s
        self.max_enqueued_tokens = max_enqueued_tokens
        self.max_tokens_param = max_tokens_param
        self.pack_limits = pack_limits or PackLimits()
        self.lease_s = lease_s
        self.tracer = tracer
        self.clock = clock
        self.calendar = calendar
        self.monotonic = monotonic
        self._closing = False
        self._avg_bytes = 2048.0
        self.blocked_until: dict[str, float] = {}  # by buffer subject, monotonic
        self._empty_fetches: dict[str, int] = {}  # due by the stream, nothing to fetch
        self.last_buffers: dict[str, BufferState] = {}

    def request_stop(self) -> None:
        """The flush loop ends at its next round."""
        self._closing = True
        self._wake.set()

    async def buffer_states(self) -> dict[str, BufferState]:
        states = await self.buffers.states(self.held.seqs, self._avg_bytes)
        self.last_buffers = states
        return states

    async def flush_loop(self) -> None:
        while not self._closing:
            reraise_if_cancelled()
            delay = 5.0
            try:
                now = datetime.fromtimestamp(self.clock(), UTC)
                for subject, state in (await self.buffer_states()).items():
                    reason = flush_reason(self.policy, state, now)
                    if reason is not None and self.blocked_until.get(subject, 0.0) > self.monotonic():
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
                await self.publisher.release_ready()
                if self.held:
                    await self.held.keep_alive()
                    delay = min(delay, self.buffers.ack_wait_s / 3)
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

    async def flush(self, subject: str) -> BatchRecord | None:
        """Move up to one batch worth of buffered items into a durable flush record."""
        with self.tracer.start_as_current_span("enrich.batch.flush", attributes={"enrichd.buffer": subject}):
            try:
                record = await self._flush(subject)
            finally:
                await self.publisher.release_quietly()  # copies of items not in this flush
            if record is not None:
                trace.get_current_span().set_attributes(
                    {"enrichd.flush_id": record.flush_id, "enrichd.items": record.count}
                )
                # Submitted once _flush has returned: the fetched messages and their
                # decoded records are released before the flush is read back and uploaded.
                await self.advance(record)
            return record

    async def _flush(self, subject: str) -> BatchRecord | None:
        msgs = await self.buffers.fetch(subject, self.policy.max_items)
        if not msgs:
            empty = self._empty_fetches[subject] = self._empty_fetches.get(subject, 0) + 1
            self.blocked_until[subject] = self.monotonic() + empty_fetch_wait_s(empty, self.poll_interval_s)
            return None
        self._empty_fetches.pop(subject, None)
        seqs = [m.metadata.sequence.stream for m in msgs]
        fid = flush_id(seqs, subject)
        existing = await self.store.get(fid)
        if existing is not None and not any(existing.holds_seq(q) for q in seqs):
            # Not a re-run after a crash (that record would hold these messages): an earlier
            # flush left our first message in the buffer (promotion) and holds the name.
            fid = flush_id(seqs, subject, with_last=True)
            existing = await self.store.get(fid)
        if existing is not None:
            # We crashed after writing this flush and before acking: ack what it holds.
            for m in msgs:
                await (m.ack() if existing.holds_seq(m.metadata.sequence.stream) else m.nak())
            return None
        msgs, records, encoded = await self._plan(msgs)
        if msgs:
            msgs, records = await self.publisher.answer_stored(msgs, records)
        if not msgs:
            return None  # everything fetched was answered from the store or is held back
        stored = [encoded[r["cid"]].line for r in records]
        sizes = [encoded[r["cid"]].size for r in records]
        tokens = [encoded[r["cid"]].tokens for r in records]
        del encoded
        seqs = [m.metadata.sequence.stream for m in msgs]
        self._avg_bytes = 0.8 * self._avg_bytes + 0.2 * (sum(sizes) / len(sizes))
        n = fit(
            sizes,
            tokens,
            max_items=self.policy.max_items,
            max_bytes=self.policy.max_bytes,
            max_enqueued_tokens=self.max_enqueued_tokens,
        )
        n = await self.spend.within_budget(records, tokens, n)
        keep, later = msgs[:n], msgs[n:]
        kept = records[:n]
        first = records[0]
        try:
            if n == 0:
                raise BudgetExhaustedError("all", 0.0, 0.0)
            day, reserved = await self.spend.reserve(kept, tokens[:n])
        except BudgetExhaustedError as exc:
            for m in msgs:
                await m.nak()
            wait = budget_wait_s(self.spend.recheck_s, self.calendar())
            self.blocked_until[subject] = self.monotonic() + wait
            log.warning("buffer waits for the budget", extra={"buffer": subject, "reason": str(exc)})
            return None
        now = self.clock()
        record = BatchRecord(
            flush_id=fid,
            endpoint=first["endpoint"],
            model=first["model"],
            provider="openai",
            state="prepared",
            created_at=now,
            count=n,
            size_bytes=sum(sizes[:n]),
            tokens=sum(tokens[:n]),
            buffer_ranges=seq_ranges(seqs[:n]),
            owner=self.instance_id,
            lease_until=now + self.lease_s,
            status_changed_at=now,
            budget_day=day,
            reserved_usd=reserved,
            promote_at=self.promotions.promote_at(kept) if self.promotions is not None else None,
        )
        # Packs are made from what goes into this flush (after the cuts, so none is split).
        lines, requests = pack_lines(
            kept, stored[:n], self.registry, limits=self.pack_limits, max_tokens_param=self.max_tokens_param
        )
        await self.store.put_items(fid, lines)
        await self.store.create(record)
        self.held.sent(kept, fid)
        failpoints.hit("after_flush_record")
        for m in keep:
            await m.ack()
        for m in later:
            await m.nak()
        log.info(
            "flush written",
            extra={
                "flush_id": fid,
                "items": n,
                "requests": requests,
                "tokens": record.tokens,
                "left_in_buffer": len(later),
            },
        )
        return record

    async def _plan(self, msgs: list[Any]) -> tuple[list[Any], list[dict[str, Any]], dict[str, Encoded]]:
        """Decode and sort the fetched messages (:func:`plan_fetch`): duplicates acked,
        copies of items in flight held back, unbuildable items ended; the rest, in fetch
        order, with their flush lines, request sizes and prompt tokens by custom id."""
        decoded = [fastjson.loads(m.data) for m in msgs]
        if self.promotions is not None:
            msgs, decoded = await self._leave_promoted(msgs, decoded, self.promotions)
        plan = plan_fetch(
            decoded, self.held.inflight, registry=self.registry, max_tokens_param=self.max_tokens_param
        )
        for index in plan.duplicates:
            await msgs[index].ack()
        for index in plan.held:
            r = decoded[index]
            await self.held.hold((r["handler"], r["item"]["id"]), msgs[index], r)
        if plan.unbuildable:
            await self._end_unbuildable([(msgs[i], decoded[i], exc) for i, exc in plan.unbuildable])
        records = [decoded[e.index] for e in plan.send]
        return (
            [msgs[e.index] for e in plan.send],
            records,
            {r["cid"]: e for r, e in zip(records, plan.send, strict=True)},
        )

    async def _leave_promoted(
        self, msgs: list[Any], decoded: list[dict[str, Any]], promotions: Promotions
    ) -> tuple[list[Any], list[dict[str, Any]]]:
        """Items with a deadline (CONTRACT §11): one answered by promotion is taken out of
        its buffer (acked, not sent); one being promoted here, or due for it now (after a
        restart nothing else remembers it), is left in the buffer for a while and
        promoted. The rest go on to the flush."""
        if not any(r["item"].get("deadline") for r in decoded):
            return msgs, decoded
        taken = await promotions.taken()
        keep_msgs, keep = [], []
        for m, r in zip(msgs, decoded, strict=True):
            if r["item"].get("deadline"):
                if promotion_key(r["handler"], r["item"]["id"], r.get("intake_seq")) in taken:
                    await m.ack()
                    continue
                if promotions.busy(r) or promotions.due(r):
                    promotions.wanted(r)
                    await m.nak(delay=PROMOTION_RECHECK_S)
                    continue
            keep_msgs.append(m)
            keep.append(r)
        return keep_msgs, keep

    async def _end_unbuildable(self, failed: list[tuple[Any, dict[str, Any], EnrichError]]) -> None:
        """Buffered items whose request cannot be built any more (their handler was removed,
        or its prompt now names a field they lack) end with that error and a DLQ entry."""
        messages: list[Message] = []
        now = self.calendar()
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
            ending = endings.end(
                outcome,
                intake_seq=r.get("intake_seq"),
                subject=self.subjects.intake_prefix + handler,
                item=data,
                raw=None,
                encode=lambda e: self.publisher.redact(dumps(e)).encode(),
                max_dlq_bytes=self.publisher.max_message_bytes,
                header_on_error=False,
            )
            assert ending.dlq_payload is not None and ending.dlq_msg_id is not None
            messages.append(
                (self.subjects.dlq(handler), ending.dlq_payload, {"Nats-Msg-Id": ending.dlq_msg_id})
            )
            messages.append(
                (
                    self.subjects.out(handler),
                    self.publisher.redact(dumps(ending.event)).encode(),
                    ending.headers,
                )
            )
            self.publisher.metrics.outcome(ending.event, None)
            log.log(ending.log_level, ending.log_message, extra=ending.log_fields)
        await self.publisher.acked(await self.publisher.send_nowait(messages), messages)
        for m, _, _ in failed:
            await m.ack()
