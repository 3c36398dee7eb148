"""Finishing an item on the sync route: the ending (service/core/endings.py) written —
store put or DLQ entry, and the result event, together — then metrics, alert and the
log line."""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Any

from service.core import endings
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
    ) -> None:
        self._store = store
        self._sink = sink
        self._counters = counters
        self._metrics = metrics
        self._clock = clock
        self._alerts = alerts

    async def finish(self, outcome: Outcome, *, item: Item | None, intake: Intake) -> dict[str, Any]:
        """Store (ok results) or dead-letter (errors), and publish the result event; the
        two writes go out together and both are acknowledged before this returns. A sync
        request (no intake seq) gets no event on the stream: its reply is the event."""
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
        writes: list[Coroutine[Any, Any, None]] = []
        if outcome.ok:
            writes.append(self._store.put(ending.event, intake_seq=intake.seq))
            self._counters.ok += 1
        else:
            assert outcome.error is not None and ending.dlq_payload is not None and ending.dlq_msg_id
            self._counters.error += 1
            by_code = self._counters.by_code
            by_code[outcome.error.code] = by_code.get(outcome.error.code, 0) + 1
            writes.append(self._sink.dlq(outcome.handler, ending.dlq_payload, msg_id=ending.dlq_msg_id))
            log.log(ending.log_level, ending.log_message, extra=ending.log_fields)
        if intake.seq is not None:
            writes.append(self._sink.result(ending.event, msg_id=ending.msg_id, intake_seq=ending.header_seq))
        await asyncio.gather(*writes)
        self._metrics.outcome(ending.event, (outcome.completed_at - outcome.received_at).total_seconds())
        if self._alerts is not None:
            self._alerts.outcome(ok=outcome.ok)
        if outcome.ok and log.isEnabledFor(logging.DEBUG):
            log.log(ending.log_level, ending.log_message, extra=ending.log_fields)
        return ending.event

    async def from_store(self, intake: Intake, item: Item, stored: StoredResult) -> dict[str, Any]:
        """Answer an intake message with the stored result of its (handler, id)."""
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
        if intake.seq is not None:  # the header names the intake message this answers
            await self._sink.result(ending.event, msg_id=ending.msg_id, intake_seq=ending.header_seq)
        if ending.cached:
            self._counters.cached += 1
            self._metrics.outcome(ending.event, (now - intake.received_at).total_seconds())
        return ending.event
