"""What the batch path publishes for a finished flush: result events, DLQ entries and
result-store puts (in chunks, checkpointed), its lifecycle event; and the answers from
the result store for copies of answered items (held copies released)."""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext
from opentelemetry import trace
from opentelemetry.trace import SpanKind

from handlers import HandlerSpec
from service import failpoints
from service.aio import reraise_if_cancelled
from service.batch.chain_out import StepOut
from service.batch.held import HeldCopies
from service.batch.lease import Leases
from service.batch.ports import Promotions
from service.batch.records import carried_usage, event_body, record_token
from service.batch.spend import Spend
from service.contract.subjects import Subjects
from service.core import endings
from service.core.batch_info import BatchInfo
from service.core.batch_outcomes import Action, Fail, Ok, Retry
from service.core.chain import PipelineSpec
from service.core.cost import Price, cost_usd, price_for
from service.core.events import DEFAULT_MAX_MESSAGE_BYTES, Outcome
from service.core.flush_plan import PACK_FIELDS
from service.observability import tracing
from service.observability.alerts import Alerter
from service.observability.telemetry import Metrics
from service.providers.openai_batch import OpenAIBatchProvider
from service.sinks.events import INTAKE_SEQ_HEADER, EventSink, Redactor, dumps, keep_second_answer
from service.state.batches import BatchRecord, BatchStore
from service.state.promoted import promotion_key
from service.state.results import ResultStore, StoredResult

log = logging.getLogger("enrichd.batch")
# subject, payload, headers
Message = tuple[str, bytes, dict[str, str]]


class Publisher:
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
        leases: Leases,
        spend: Spend,
        prices: dict[str, Price],
        batch_discount: float,
        metrics: Metrics,
        alerts: Alerter | None,
        tracer: trace.Tracer,
        held: HeldCopies,
        wake: Callable[[], None],
        results_chunk: int = 1000,
        max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
        calendar: Callable[[], datetime] = lambda: datetime.now(UTC),
        registry: Mapping[str, HandlerSpec] | None = None,
        promotions: Promotions | None = None,
        pipelines: Mapping[str, PipelineSpec] | None = None,
    ) -> None:
        self.registry = registry or {}
        self.promotions = promotions
        self.js = js
        self.subjects = subjects
        self.store = store
        self.results = results
        self.sink = sink
        self.redact = redact
        self.provider = provider
        self.leases = leases
        self.spend = spend
        self.prices = prices
        self.batch_discount = batch_discount
        self.metrics = metrics
        self.alerts = alerts
        # What this process published (ok / error / retried / cached), for the shutdown line.
        self.tally: collections.Counter[str] = collections.Counter()
        self.tracer = tracer
        self.held = held
        self.wake = wake  # a held copy went back to the buffer: the flush loop looks again
        self.results_chunk = results_chunk
        self.max_message_bytes = max_message_bytes  # the server's max_payload, less headers
        self.calendar = calendar
        self.steps = StepOut(
            subjects=subjects,
            results=results,
            redact=redact,
            pipelines=pipelines or {},
            metrics=metrics,
            calendar=calendar,
            max_message_bytes=max_message_bytes,
        )

    def _version(self, handler: str) -> str | None:
        """The handler's version now: a stored answer counts only under it (a handler
        that is gone has none, and its items are not answered from the store)."""
        spec = self.registry.get(handler)
        return spec.version if spec is not None else "-"

    async def answer_stored(
        self, msgs: list[Any], records: list[dict[str, Any]]
    ) -> tuple[list[Any], list[dict[str, Any]]]:
        """Items whose answer is already stored are answered from the store and not sent:
        the original event again for a redelivery of the message that produced it, else a
        ``cached`` copy for the new message. Looked up many at a time."""
        found: list[StoredResult | None] = []
        for begin in range(0, len(records), 500):
            part = records[begin : begin + 500]
            found += await asyncio.gather(
                *(self.results.get(r["handler"], r["item"]["id"], self._version(r["handler"])) for r in part)
            )
        if not any(found):
            return msgs, records
        keep_msgs, keep_records, answered, messages = [], [], [], []
        now = self.calendar()
        for m, r, stored in zip(msgs, records, found, strict=True):
            if stored is None:
                keep_msgs.append(m)
                keep_records.append(r)
                continue
            received = datetime.fromisoformat(r["received_at"].replace("Z", "+00:00"))
            ending = endings.from_store(
                stored.event,
                stored.intake_seq,
                intake_seq=r["intake_seq"],
                metadata=r["item"].get("metadata"),
                source=r["item"].get("source"),
                received_at=received,
                now=now,
            )
            if ending.cached:
                self.tally["cached"] += 1
                seen = {**ending.event, "step_of": r["chain"]["pipeline"]} if r.get("chain") else ending.event
                self.metrics.outcome(seen, (now - received).total_seconds())
            answered.append(m)
            if self.steps.state_of(r) is not None:  # a pipeline step: on to what follows it
                messages.extend(self.steps.after(r, ending.event))
                continue
            payload = self.redact(dumps(ending.event)).encode()
            messages.append((self.subjects.out(r["handler"]), payload, ending.headers))
        await self.acked(await self.send_nowait(messages), messages)
        for m in answered:
            await m.ack()
        log.info("answered from the result store at flush", extra={"items": len(answered)})
        return keep_msgs, keep_records

    async def publish(
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
        # Items answered by promotion meanwhile (CONTRACT §11) keep that answer only.
        taken: set[str] = set()
        if self.promotions is not None and any(it["item"].get("deadline") for it in items[start:]):
            taken = await self.promotions.taken()
        # Chunk N+1 is built and sent while chunk N's acks come back; the checkpoint moves
        # past a chunk only once all its acks are in. A restart resends from the last
        # checkpoint, and every message it resends carries the same Nats-Msg-Id.
        previous: tuple[list[Any], list[Message], int] | None = None
        for begin in range(start, len(items), self.results_chunk):
            chunk = range(begin, min(begin + self.results_chunk, len(items)))
            pending: list[Message] = []
            observed: list[tuple[dict[str, Any], float | None]] = []
            for index in chunk:
                it = items[index]
                if taken and promotion_key(it["handler"], it["item"]["id"], it.get("intake_seq")) in taken:
                    self.tally["promoted"] += 1
                    continue
                pending.extend(self.messages(record, it, actions[index], observed))
            self.metrics.outcomes(observed)
            futures = await self.send_nowait(pending)
            failpoints.hit("mid_publish")  # published, not yet checkpointed
            if previous is not None:
                await self.acked(previous[0], previous[1])
                record.published_upto = previous[2]
                record = await self.leases.save(record)
            previous = (futures, pending, chunk.stop)
        if previous is not None:
            await self.acked(previous[0], previous[1])
            record.published_upto = previous[2]
            record = await self.leases.save(record)
        if self.spend.owes(record) and start == 0:
            await self.spend.settle(record, items, actions)
        for action in actions[start:]:
            self.tally[
                "ok" if isinstance(action, Ok) else "error" if isinstance(action, Fail) else "retried"
            ] += 1
        record.state = "published"
        record.outcome = counts
        record = await self.leases.save(record)
        self.held.published(items)
        topic = {
            "completed": "batch.completed",
            "expired": "batch.expired",
            "cancelled": "batch.cancelled",
            "failed": "batch.failed",
        }.get(info.status, "batch.completed")
        body: dict[str, Any] = {**event_body(record, self.calendar().timestamp()), **counts}
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
        await self.release_quietly()  # copies of these items get their cached answers now

    async def release_ready(self) -> None:
        """Answer the held copies whose first copy is no longer in flight in this replica:
        from the result store (``cached``, each with its own metadata); a copy whose
        first one got no stored answer (an error) goes back to the buffer for a flush."""
        copies = self.held.take_ready()
        if not copies:
            return
        try:
            left, _ = await self.answer_stored([c.msg for c in copies], [c.record for c in copies])
            for m in left:
                await m.nak()
        except Exception:
            reraise_if_cancelled()
            self.held.put_back(copies)  # try again next round (a published answer is deduplicated)
            raise
        if left:
            self.wake()

    async def release_quietly(self) -> None:
        """:meth:`release_ready`, its failure logged: the flush loop tries again."""
        try:
            await self.release_ready()
        except Exception:
            reraise_if_cancelled()
            log.exception("answering held copies failed; trying again")

    def messages(
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
            return [self.retry_message(record, item, action)]
        usage = action.usage + carried_usage(item)  # and what its earlier pack spent on it
        price = price_for(record.model, self.prices)
        outcome = Outcome(
            id=data["id"],
            handler=handler,
            route="batch",
            model=record.model,
            received_at=datetime.fromisoformat(item["received_at"].replace("Z", "+00:00")),
            completed_at=self.calendar(),
            batch_id=record.batch_id,
            attempts=int(item.get("batch_attempts", 0)) + 1,
            usage=usage,
            cost_usd=cost_usd(usage, price, route="batch", batch_discount=self.batch_discount),
            metadata=data.get("metadata"),
            source=data.get("source"),
            result=action.result if isinstance(action, Ok) else None,
            error=action.error if isinstance(action, Fail) else None,
            last_message=action.last_message if isinstance(action, Fail) else None,
            handler_version=item.get("handler_version"),
            packed=action.packed,
        )
        # One ending for both routes (service/core/endings.py): event, ids, header, DLQ
        # entry and log line. Batch error events carry no intake-seq header (their
        # ``:error:<seq>`` id names the intake message).
        ending = endings.end(
            outcome,
            intake_seq=item.get("intake_seq"),
            subject=self.subjects.intake_prefix + handler,
            item=data,
            raw=None,
            encode=lambda e: self.redact(dumps(e)).encode(),
            max_dlq_bytes=self.max_message_bytes,
            header_on_error=False,
        )
        event = ending.event
        latency_s = (outcome.completed_at - outcome.received_at).total_seconds()
        # a pipeline step's event is counted as a step, not as a result of its own
        seen = {**event, "step_of": item["chain"]["pipeline"]} if item.get("chain") else event
        if observed is None:
            self.metrics.outcome(seen, latency_s)
        else:
            observed.append((seen, latency_s))
        if self.alerts is not None:
            self.alerts.outcome(ok=outcome.ok)
        if log.isEnabledFor(ending.log_level):
            log.log(ending.log_level, ending.log_message, extra=ending.log_fields)
        out: list[Message] = []
        event_json = dumps(event)
        if isinstance(action, Ok):
            subject, payload = self.results.put_message_json(
                handler, data["id"], event_json, intake_seq=item.get("intake_seq")
            )
            out.append((subject, payload, {}))
        step = self.steps.state_of(item) is not None
        if not isinstance(action, Ok):
            assert ending.dlq_payload is not None and ending.dlq_msg_id is not None
            if not step:  # (a pipeline's DLQ entry is its final ending's)
                out.append(
                    (self.subjects.dlq(handler), ending.dlq_payload, {"Nats-Msg-Id": ending.dlq_msg_id})
                )
            if data.get("deadline") and self.promotions is not None:
                # ended here: a promotion scheduled for it must not answer it again (an
                # ok ending needs no mark: the store holds it under this intake seq)
                out.append((*self.promotions.mark_message(item), {}))
        if step:
            # A pipeline step: its answer stored (above), then the next step's message or
            # the pipeline's final ending instead of a result event of its own. A restart
            # resends these from the checkpoint under the same ids.
            return out + self.steps.after(item, event)
        headers = ending.headers
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

    def retry_message(self, record: BatchRecord, item: dict[str, Any], action: Retry) -> Message:
        """An item back into the buffer, for a later batch."""
        again = {
            **item,
            "batch_attempts": int(item.get("batch_attempts", 0)) + 1,
            "last_batch": record.batch_id,
        }
        if "pack" in item:  # out of its pack; its own request is built at the next flush
            for key in (*PACK_FIELDS, "body"):
                again.pop(key, None)
        if action.unpacked:
            again["unpacked"] = True
        if action.usage.input_tokens or action.usage.output_tokens:
            again["carried_usage"] = (carried_usage(item) + action.usage).to_dict()
        token = self.subjects.buffer(record_token(record))
        msg_id = f"{item['handler']}:{item['item']['id']}:{item['intake_seq']}:b{again['batch_attempts']}"
        return (token, dumps(again).encode(), {"Nats-Msg-Id": msg_id})

    async def send_nowait(self, messages: list[Message]) -> list[Any]:
        return [await self.js.publish_async(s, p, headers=h or None) for s, p, h in messages]

    async def acked(self, futures: list[Any], messages: list[Message]) -> None:
        """Wait for the PubAcks of ``messages``; an ``ok`` event dropped as a duplicate of
        another intake message's answer is sent again (sinks.events.keep_second_answer)."""
        results = await asyncio.gather(*futures, return_exceptions=True)
        failures = [r for r in results if isinstance(r, BaseException)]
        if failures:
            raise RuntimeError(f"{len(failures)} of {len(futures)} publishes failed: {failures[0]!r}")
        for ack, (subject, payload, headers) in zip(results, messages, strict=True):
            if headers and INTAKE_SEQ_HEADER in headers and getattr(ack, "duplicate", False):
                await keep_second_answer(self.js, self.subjects, ack, subject, payload, headers)
