"""Finishing an item on the sync route: the ending (service/core/endings.py) written —
store put or DLQ entry, and the result event, together — then metrics, alert and the
log line. A pipeline step's ending (service/core/chain.py) is its answer stored, then
the next step's message, or the pipeline's final ending."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Coroutine, Mapping
from datetime import datetime
from typing import Any

from service import failpoints
from service.core import chain as chain_core
from service.core import endings
from service.core.chain import ChainState, Final, PipelineSpec
from service.core.events import Outcome
from service.core.intake import Intake
from service.core.items import Item
from service.observability.telemetry import Metrics
from service.pipeline.counters import Counters
from service.pipeline.ports import Alerts, Sink, Store
from service.state.results import StoredResult

log = logging.getLogger("enrichd.pipeline")


class Finish:
    def __init__(
        self,
        *,
        store: Store,
        sink: Sink,
        counters: Counters,
        metrics: Metrics,
        clock: Callable[[], datetime],
        alerts: Alerts | None = None,
        pipelines: Mapping[str, PipelineSpec] | None = None,
        intake_prefix: str = "enrich.in.",
    ) -> None:
        self._pipelines = pipelines or {}
        self._intake_prefix = intake_prefix
        self._store = store
        self._sink = sink
        self._counters = counters
        self._metrics = metrics
        self._clock = clock
        self._alerts = alerts

    async def finish(
        self, outcome: Outcome, *, item: Item | None, intake: Intake, chain: ChainState | None = None
    ) -> dict[str, Any]:
        """Store (ok results) or dead-letter (errors), and publish the result event; the
        two writes go out together and both are acknowledged before this returns. A sync
        request (no intake seq) gets no event on the stream: its reply is the event.

        A pipeline step (``chain``): its ``ok`` answer is stored first (a step that runs
        again is answered from the store), then what follows it is published
        (:meth:`go_on`); returns the step's event. On ``enrich.sync`` (no intake seq) the
        caller goes on itself."""
        if chain is not None and chain.pipeline in self._pipelines:
            step_event = endings.result_event(outcome)
            if outcome.ok:
                await self._store.put(step_event, intake_seq=intake.seq)
                failpoints.hit("after_step_stored")  # the step paid and stored, the next not started
            latency_s = (outcome.completed_at - outcome.received_at).total_seconds()
            self._metrics.outcome({**step_event, "step_of": chain.pipeline}, latency_s)  # a step, no result
            self._counters.steps += 1
            if intake.seq is not None:
                await self.go_on(chain, step_event)
                failpoints.hit("after_next_step")  # the next step published, this message not acked
            return step_event
        ending = endings.end(
            outcome,
            intake_seq=intake.seq,
            subject=intake.subject,
            item=item,
            raw=intake.raw,
            encode=self._sink.encode,
            max_dlq_bytes=self._sink.max_bytes,
            request_id=uuid.uuid4().hex if intake.seq is None else None,
        )
        return await self._write(outcome, ending, intake.seq)

    async def _write(self, outcome: Outcome, ending: endings.Ending, seq: int | None) -> dict[str, Any]:
        """Store (ok) or dead-letter (error) and publish the result event (not for a sync
        request: no intake ``seq``), together; then metrics, alert and the log line."""
        writes: list[Coroutine[Any, Any, None]] = []
        if outcome.ok:
            writes.append(self._store.put(ending.event, intake_seq=seq))
            self._counters.ok += 1
        else:
            assert outcome.error is not None and ending.dlq_payload is not None and ending.dlq_msg_id
            self._counters.error += 1
            by_code = self._counters.by_code
            by_code[outcome.error.code] = by_code.get(outcome.error.code, 0) + 1
            writes.append(self._sink.dlq(outcome.handler, ending.dlq_payload, msg_id=ending.dlq_msg_id))
            log.log(ending.log_level, ending.log_message, extra=ending.log_fields)
        if seq is not None:
            writes.append(self._sink.result(ending.event, msg_id=ending.msg_id, intake_seq=ending.header_seq))
        await asyncio.gather(*writes)
        self._metrics.outcome(ending.event, (outcome.completed_at - outcome.received_at).total_seconds())
        if self._alerts is not None:
            self._alerts.outcome(ok=outcome.ok)
        if outcome.ok and log.isEnabledFor(logging.DEBUG):
            log.log(ending.log_level, ending.log_message, extra=ending.log_fields)
        return ending.event

    async def go_on(
        self, chain: ChainState, step_event: dict[str, Any], *, request_id: str | None = None
    ) -> dict[str, Any] | None:
        """After a pipeline step: publish the next step's message (None), or write the
        pipeline's final ending and return its event."""
        pipeline = self._pipelines[chain.pipeline]
        after = chain_core.after_step(pipeline, chain, step_event, now=self._clock())
        if isinstance(after, Final):
            return await self.final(after, chain, request_id=request_id)
        payload = self._sink.encode(after.state.envelope())
        if len(payload) > self._sink.max_bytes:
            ended = chain_core.too_large(
                pipeline, after.state, len(payload), self._sink.max_bytes, now=self._clock()
            )
            return await self.final(ended, chain, request_id=request_id)
        await self._sink.step(after.handler, payload, msg_id=after.msg_id)
        return None

    async def final(
        self, final: Final, chain: ChainState, *, request_id: str | None = None
    ) -> dict[str, Any]:
        """A pipeline's one result event (stored when ``ok``; dead-lettered, naming the
        failed step, when not), under the intake message that started the pipeline."""
        outcome = final.outcome
        ending = endings.end(
            outcome,
            intake_seq=chain.origin_seq,
            subject=self._intake_prefix + chain.pipeline,
            item=chain.item,
            raw=None,
            encode=self._sink.encode,
            max_dlq_bytes=self._sink.max_bytes,
            request_id=request_id or (uuid.uuid4().hex if chain.origin_seq is None else None),
            extra=final.extra,
        )
        return await self._write(outcome, ending, chain.origin_seq)

    async def from_store(
        self, intake: Intake, item: Item, stored: StoredResult, *, chain: ChainState | None = None
    ) -> dict[str, Any]:
        """Answer an intake message with the stored result of its (handler, id); a
        pipeline step's stored answer goes on to what follows it (returned: the step's
        event as answered from the store)."""
        now = self._clock()
        ending = endings.from_store(
            stored.event,
            stored.intake_seq,
            intake_seq=intake.seq,
            metadata=item.metadata,
            source=item.source,
            received_at=intake.received_at,
            now=now,
        )
        if chain is not None and chain.pipeline in self._pipelines:
            if ending.cached:
                self._counters.cached += 1
            if intake.seq is not None:
                await self.go_on(chain, ending.event)
            return ending.event
        if intake.seq is not None:  # the header names the intake message this answers
            await self._sink.result(ending.event, msg_id=ending.msg_id, intake_seq=ending.header_seq)
        if ending.cached:
            self._counters.cached += 1
            self._metrics.outcome(ending.event, (now - intake.received_at).total_seconds())
        return ending.event
