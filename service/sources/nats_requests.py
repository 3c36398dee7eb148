"""The core-NATS subscribers of the intake side: ``enrich.sync.*`` request/reply (the reply
is the item's result event, computed at once) and JetStream's MAX_DELIVERIES advisory for
the intake consumer (the message is ended with an error event and a DLQ entry)."""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from faststream.nats import NatsBroker, NatsMessage

from service.aio import reraise_if_cancelled
from service.contract.subjects import Subjects
from service.core import endings
from service.core.errors import EnrichError
from service.core.intake import Intake
from service.core.redact import Redactor
from service.sinks.events import dumps
from service.sources.ports import IntakePipeline

log = logging.getLogger("enrichd.source")


class NatsRequests:
    def __init__(
        self,
        broker: NatsBroker,
        subjects: Subjects,
        pipeline: IntakePipeline,
        redact: Redactor,
        *,
        durable: str,
        sync_workers: int = 16,
    ) -> None:
        self._broker = broker
        self._subjects = subjects
        self._pipeline = pipeline
        self._redact = redact
        self._durable = durable
        self._sync_workers = sync_workers

    def register(self) -> None:
        """Declare the core-NATS subscribers on the broker (before ``broker.start()``)."""
        s = self._subjects
        self._broker.subscriber(
            s.sync_filter,
            queue=f"{self._durable}-sync",
            max_workers=self._sync_workers,
            title="sync",
            description="Request/reply: the reply is the item's result event, computed at once.",
        )(self.on_sync)
        advisory = f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{s.stream('IN')}.{self._durable}"
        self._broker.subscriber(advisory, queue=f"{self._durable}-advisory", include_in_schema=False)(
            self.on_max_deliveries
        )

    async def on_sync(self, msg: NatsMessage) -> bytes:
        intake = Intake(
            raw=msg.body,
            handler=msg.raw_message.subject.removeprefix(self._subjects.sync_prefix),
            subject=msg.raw_message.subject,
            received_at=datetime.now(UTC),
        )
        try:
            event = await self._pipeline.process(intake, force_sync=True)
        except Exception as exc:  # noqa: BLE001 - the requester must always get an answer
            log.exception("sync request failed")
            event = endings.result_event(
                endings.salvaged_outcome(
                    intake.raw,
                    intake.handler,
                    EnrichError("internal", str(exc), retryable=True).info(),
                    received_at=intake.received_at,
                    now=datetime.now(UTC),
                )
            )
        return self._redact(dumps(event)).encode()

    async def on_max_deliveries(self, advisory: dict[str, Any]) -> None:
        """A message that was delivered ``max_deliver`` times without an ack: end it with
        an error event and a DLQ entry instead of leaving it silently behind. Never
        raises (a core-NATS advisory is not sent again): what fails is logged."""
        try:
            await self._end_undelivered(advisory)
        except Exception:  # noqa: BLE001 - the last resort must not fail silently either
            reraise_if_cancelled()
            log.exception("could not end a message after max deliveries", extra={"advisory": advisory})

    async def _end_undelivered(self, advisory: dict[str, Any]) -> None:
        js = self._broker.config.connection_state.stream
        try:
            raw = await js.get_msg(advisory["stream"], advisory["stream_seq"])
        except Exception:  # noqa: BLE001 - gone (limits, purge): nothing left to end
            log.warning("message after max deliveries is gone", extra={"advisory": advisory})
            return
        subject = raw.subject or ""
        intake = Intake(
            raw=raw.data or b"",
            handler=subject.removeprefix(self._subjects.intake_prefix),
            subject=subject,
            received_at=raw.time.astimezone(UTC) if raw.time else datetime.now(UTC),
            seq=raw.seq,
        )
        error = EnrichError(
            "max_deliveries",
            f"delivered {advisory.get('deliveries')} times without completing",
            retryable=True,
        )
        outcome = endings.salvaged_outcome(  # never raises
            intake.raw,
            intake.handler,
            error.info(),
            received_at=intake.received_at,
            now=datetime.now(UTC),
            attempts=int(advisory.get("deliveries") or 0),
        )
        for attempt in range(3):  # NATS may be briefly unreachable: a few tries
            try:
                await self._pipeline.finish(outcome, item=None, intake=intake)
                return
            except Exception:  # noqa: BLE001
                reraise_if_cancelled()
                if attempt == 2:
                    raise
                await asyncio.sleep(1.0 + attempt)
