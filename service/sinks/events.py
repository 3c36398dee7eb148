"""The only code that publishes what the daemon produces: result events, DLQ entries,
lifecycle events and buffered items. Every payload is scrubbed of secrets first."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from nats.js import JetStreamContext

from service.aio import reraise_if_cancelled
from service.contract.subjects import Subjects
from service.core import fastjson
from service.core.budget import exceeded_events
from service.core.endings import INTAKE_SEQ_HEADER
from service.core.events import DEFAULT_MAX_MESSAGE_BYTES, result_msg_id
from service.core.intake import BufferWrite
from service.core.redact import Redactor
from service.observability import tracing

__all__ = ["INTAKE_SEQ_HEADER", "EventSink", "Redactor", "dumps", "keep_second_answer"]

log = logging.getLogger("enrichd.sink")


def dumps(obj: Any) -> str:
    """Compact JSON text, UTF-8 kept as is (see service/core/fastjson.py)."""
    return fastjson.dumps(obj).decode()


async def keep_second_answer(
    js: JetStreamContext, subjects: Subjects, ack: Any, subject: str, payload: bytes, headers: dict[str, str]
) -> None:
    """JetStream dropped this ``ok`` event as a duplicate of ``<id>:<handler>``. When the
    event it kept came from another intake message (two copies of one item answered at
    the same time, e.g. on two replicas), this one must still be delivered: send it again
    as ``<id>:<handler>:dup:<intake seq>``. A redelivery of the same message is left
    deduplicated."""
    ours = headers.get(INTAKE_SEQ_HEADER)
    if not getattr(ack, "duplicate", False) or ours is None:
        return
    try:
        kept = await js.get_msg(subjects.stream("OUT"), ack.seq)
    except Exception:  # noqa: BLE001 - the kept event is gone (limits): ours is the one left
        kept = None
    if kept is not None and (kept.headers or {}).get(INTAKE_SEQ_HEADER) == ours:
        return
    again = {**headers, "Nats-Msg-Id": f"{headers['Nats-Msg-Id']}:dup:{ours}"}
    await js.publish(subject, payload, headers=again)


class EventSink:
    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        redact: Redactor,
        *,
        timeout_s: float = 10.0,
        max_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    ):
        self._js = js
        self._subjects = subjects
        self._redact = redact
        self._timeout_s = timeout_s
        self._max_bytes = max_bytes  # the largest payload NATS takes, less room for headers

    @property
    def max_bytes(self) -> int:
        """The largest payload this sink writes (an ending's DLQ entry is fitted to it)."""
        return self._max_bytes

    def encode(self, obj: Any) -> bytes:
        """A payload as published: compact JSON, scrubbed of secrets."""
        return self._redact(dumps(obj)).encode()

    async def result(
        self, event: dict[str, Any], *, msg_id: str | None = None, intake_seq: int | None = None
    ) -> None:
        """Publish a result event on ``enrich.out.<handler>`` and wait for the PubAck."""
        plain = result_msg_id(event["id"], event["handler"])
        headers = tracing.inject({"Nats-Msg-Id": msg_id or plain})
        if intake_seq is not None:
            headers[INTAKE_SEQ_HEADER] = str(intake_seq)
        subject, payload = self._subjects.out(event["handler"]), self.encode(event)
        ack = await self._js.publish(subject, payload, headers=headers, timeout=self._timeout_s)
        if headers["Nats-Msg-Id"] == plain:
            await keep_second_answer(self._js, self._subjects, ack, subject, payload, headers)

    async def step(self, pipeline: str, payload: bytes, *, msg_id: str) -> None:
        """Publish a pipeline's next step (encoded) on ``<prefix>.in.<pipeline>`` (service/core/chain.py)."""
        await self._js.publish(
            self._subjects.intake(pipeline),
            payload,
            headers={"Nats-Msg-Id": msg_id},
            timeout=self._timeout_s,
        )

    async def dlq(self, handler: str, payload: bytes, *, msg_id: str) -> None:
        """Publish a DLQ entry (built and fitted by service/core/endings.py)."""
        await self._js.publish(
            self._subjects.dlq(handler), payload, headers={"Nats-Msg-Id": msg_id}, timeout=self._timeout_s
        )

    async def lifecycle(self, topic: str, payload: dict[str, Any], *, msg_id: str | None = None) -> None:
        headers = {"Nats-Msg-Id": msg_id} if msg_id else None
        await self._js.publish(
            self._subjects.event(topic), self.encode(payload), headers=headers, timeout=self._timeout_s
        )

    async def budget_exceeded(
        self, day: str, scope: str, cap_usd: float, spent_usd: float, *, at: str, instance: str
    ) -> None:
        """``budget.exceeded`` and its alert, once per budget day and scope (the message
        ids dedupe the replicas that hit the cap at the same time)."""
        body, alert = exceeded_events(
            day=day, scope=scope, cap_usd=cap_usd, spent_usd=spent_usd, at=at, instance=instance
        )
        log.warning("budget exceeded: new work waits for the next budget day", extra=body)
        await self.lifecycle("budget.exceeded", body, msg_id=f"{day}:{scope}:budget")
        await self.lifecycle("alert", alert, msg_id=f"{day}:{scope}:budget-alert")

    async def buffer_many(self, writes: list[BufferWrite]) -> list[bool]:
        """Publish many buffer messages at once and wait for their PubAcks together:
        True for each one stored. One write that cannot be sent fails alone."""
        futures: list[asyncio.Future[Any] | None] = []
        for write in writes:
            try:
                futures.append(
                    await self._js.publish_async(
                        self._subjects.buffer(write.subject_token),
                        write.payload,
                        headers={"Nats-Msg-Id": write.msg_id},
                    )
                )
            except Exception:  # noqa: BLE001 - this one is not stored; its message is redelivered
                reraise_if_cancelled()  # nats-py turns a cancel while it waits into its own error
                log.warning("publishing a buffer message failed", exc_info=True)
                futures.append(None)
        sent = [f for f in futures if f is not None]
        try:
            if sent:
                await asyncio.wait(sent, timeout=self._timeout_s)
        finally:
            for future in sent:
                # nats-py frees a publish_async slot only on a reply or a cancel: a PubAck
                # lost in a reconnect must not hold its slot for ever
                if not future.done():
                    future.cancel()
        return [f is not None and not f.cancelled() and f.exception() is None for f in futures]
