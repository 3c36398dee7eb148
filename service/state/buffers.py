"""The BUFFER stream, read side: what each buffer holds, and its messages fetched through
one durable pull consumer per buffer subject (acked or NAKed by the flush)."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from service.contract.subjects import Subjects
from service.core.batching import BufferState

log = logging.getLogger("enrichd.batch")


class Buffers:
    def __init__(self, js: JetStreamContext, subjects: Subjects, *, consumer: str, ack_wait_s: float) -> None:
        self.js = js
        self.subjects = subjects
        self.consumer = consumer
        self.ack_wait_s = ack_wait_s  # a fetched message not acked by then is delivered again
        self._subs: dict[str, Any] = {}

    async def states(self, held: Mapping[str, set[int]], avg_bytes: float) -> dict[str, BufferState]:
        """Each buffer's count, estimated bytes and oldest message, leaving out the
        sequences in ``held`` (copies held back wait for an answer, not a flush)."""
        stream = self.subjects.stream("BUFFER")
        info = await self.js.stream_info(stream, subjects_filter=self.subjects.buffer_filter)
        states: dict[str, BufferState] = {}
        for subject, count in (info.state.subjects or {}).items():
            seqs = held.get(subject, set())
            count -= len(seqs)
            if count <= 0:
                continue
            oldest = None
            try:
                seq = info.state.first_seq or 1
                for _ in range(1 + min(len(seqs), 50)):
                    first = await self.js.get_msg(stream, seq=seq, next=True, subject=subject)
                    oldest = first.time
                    if first.seq not in seqs:
                        break
                    seq = first.seq + 1
            except Exception:  # noqa: BLE001 - a message flushed meanwhile; age unknown this round
                oldest = None
            states[subject] = BufferState(count=count, bytes=int(count * avg_bytes), oldest=oldest)
        return states

    async def _sub(self, subject: str) -> Any:
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
                    ack_wait=self.ack_wait_s,
                    max_deliver=-1,
                    max_ack_pending=-1,
                ),
            )
            self._subs[subject] = sub
        return sub

    async def fetch(self, subject: str, limit: int) -> list[Any]:
        """Up to ``limit`` messages of one buffer, as many as come within a short wait."""
        sub = await self._sub(subject)
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

    async def close(self) -> None:
        """Release the subscriptions (a pending pull would stall the NATS drain)."""
        subs, self._subs = self._subs, {}
        for sub in subs.values():
            try:
                await sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection may already be closing
                log.debug("unsubscribe failed", exc_info=True)


async def nak_quietly(msg: Any) -> None:
    """NAK a fetched message now rather than wait for the ack wait; a failure is harmless
    (it is delivered again after the ack wait anyway)."""
    try:
        await msg.nak()
    except Exception:  # noqa: BLE001 - redelivered after ack_wait anyway
        log.debug("nak of a held copy failed", exc_info=True)
