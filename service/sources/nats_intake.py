"""The NATS intake: the only code that reads intake messages and acks them.

``enrich.in.>`` is consumed by a durable pull consumer with explicit acks (every replica
binds the same durable, so each message goes to one of them). A message is acked only
after the pipeline's ``process`` (or ``buffer_many``) returned, i.e. after its result
event or its buffered record is stored in JetStream. ``enrich.sync.*`` and the
max-deliveries advisory are served by service/sources/nats_requests.py.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import AbstractContextManager, nullcontext
from datetime import UTC, datetime
from typing import Any

import nats
import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind

from service import failpoints
from service.aio import quietly, reraise_if_cancelled
from service.contract.subjects import Subjects
from service.core.intake import BufferWrite, DeferError, Intake, Prepared
from service.observability import tracing
from service.sources.ports import IntakePipeline

log = logging.getLogger("enrichd.source")


class NatsIntake:
    def __init__(
        self,
        subjects: Subjects,
        pipeline: IntakePipeline,
        *,
        durable: str,
        ack_wait_s: float,
        max_deliver: int,
        max_inflight: int = 512,
    ) -> None:
        self._subjects = subjects
        self._pipeline = pipeline
        self._durable = durable
        self._ack_wait_s = ack_wait_s
        self._max_deliver = max_deliver
        self._slots = asyncio.Semaphore(max_inflight)
        self._max_inflight = max_inflight
        self._tasks: set[asyncio.Task[None]] = set()
        self._sub: Any = None
        self._paused_until = 0.0
        self._held: dict[int, Msg] = {}  # in-flight intake messages, by id()
        # Stream sequences being processed, and whether that ended in an ack. A message
        # JetStream redelivers meanwhile (ack_wait passed: the loop was frozen, or a call
        # outlived the heartbeats) is the same intake message: it waits for the first
        # delivery's ending and is acked with it, never processed (or answered) again.
        self._working: dict[int, asyncio.Future[bool]] = {}
        self._chunks: dict[asyncio.Task[None], int] = {}  # buffer-write tasks: their messages

    async def start(self, js: JetStreamContext) -> None:
        """Bind the durable intake consumer; the daemon then runs :meth:`pull_loop` and
        :meth:`heartbeats` as its own supervised tasks.

        The pull loop is ours rather than FastStream's: FastStream 0.7.8 suppresses only
        ``nats.errors.TimeoutError`` around ``fetch``, while nats-py 2.16 can raise a plain
        ``asyncio.TimeoutError`` there, which restarts its consumer task with an ERROR log.
        """
        self._sub = await js.pull_subscribe(
            self._subjects.intake_filter,
            durable=self._durable,
            stream=self._subjects.stream("IN"),
            config=ConsumerConfig(
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=self._ack_wait_s,
                max_deliver=self._max_deliver,
                max_ack_pending=self._max_inflight * 4,
            ),
        )

    async def pull_loop(self) -> None:
        while True:
            try:
                await self._pull_once()
            except Exception:  # the loop must outlive any one failure, or intake stops
                reraise_if_cancelled()
                log.exception("intake round failed; going on")
                await asyncio.sleep(1.0)

    async def _pull_once(self) -> None:
        assert self._sub is not None
        loop = asyncio.get_running_loop()
        pause = self._paused_until - loop.time()
        if pause > 0:  # work is waiting for the budget: leave the rest in NATS
            await asyncio.sleep(min(pause, 5.0))
            return
        await self._slots.acquire()  # wait for room before asking for more
        self._slots.release()
        if self._free_slots() <= 0:  # full of buffer writes in flight
            if self._tasks:
                await asyncio.wait(set(self._tasks), return_when=asyncio.FIRST_COMPLETED)
            return
        room = min(256, self._free_slots())
        try:
            msgs = await self._sub.fetch(room, timeout=1.0)
        except (TimeoutError, nats.errors.TimeoutError):
            return
        except (
            nats.errors.ConnectionClosedError,
            nats.errors.ConnectionReconnectingError,
            nats.js.errors.ServiceUnavailableError,
        ) as exc:
            log.warning("intake fetch failed; retrying", extra={"error": str(exc)})
            await asyncio.sleep(1.0)
            return
        await self._take(msgs)

    async def _take(self, msgs: list[Msg]) -> None:
        """Batch-routed items of one fetch are published to their buffers together and
        acked together once stored (one task for all of them); the rest get a task each."""
        chunk: list[tuple[Msg, BufferWrite, Span | None]] = []
        for msg in msgs:  # held at once: waiting for a slot must not let ack_wait run out
            self._held[id(msg)] = msg
        for msg in msgs:
            span: Span | None = None
            try:
                seq = msg.metadata.sequence.stream
                first = self._working.get(seq)
                if first is not None:
                    self._follow(msg, seq, first)
                    continue
                self._working[seq] = asyncio.get_running_loop().create_future()
                intake = self._intake(msg)
                span = self._intake_span(msg, intake)
                with _current(span):
                    taken = self._pipeline.buffer_now(intake)
                if isinstance(taken, BufferWrite):
                    chunk.append((msg, taken, span))
                else:
                    await self._start(msg, taken, span)
            except Exception:  # noqa: BLE001 - one message must not stop the others
                reraise_if_cancelled()
                log.exception("intake message not taken; it will be redelivered")
                if span is not None and span not in (c[2] for c in chunk):
                    span.end()
                self._held.pop(id(msg), None)
                self._ended(msg, acked=False)
                await quietly(msg.nak(delay=2.0))
        if chunk:
            task = asyncio.create_task(self._run_chunk(chunk), name=f"chunk-{len(chunk)}")
            self._tasks.add(task)
            self._chunks[task] = len(chunk)
            task.add_done_callback(self._chunk_done)

    def _chunk_done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._chunks.pop(task, None)

    def _ended(self, msg: Msg, *, acked: bool) -> None:
        """The processing of ``msg``'s stream sequence is over (acked, or left to JetStream
        to redeliver): copies that arrived meanwhile follow it."""
        try:
            seq = msg.metadata.sequence.stream
        except Exception:  # noqa: BLE001 - no metadata: never registered
            return
        first = self._working.pop(seq, None)
        if first is not None and not first.done():
            first.set_result(acked)

    def _follow(self, msg: Msg, seq: int, first: asyncio.Future[bool]) -> None:
        """A redelivery of a message still being processed here: hold it (heartbeats keep
        it ours) until the first delivery ends, then ack it too, or leave it for a later
        redelivery when the first one was not acked. Nothing is processed or published."""
        log.info("redelivered while in flight; following the first delivery", extra={"seq": seq})

        async def follow() -> None:
            try:
                acked = await asyncio.shield(first)
            finally:
                self._held.pop(id(msg), None)
            await quietly(msg.ack() if acked else msg.nak(delay=2.0))

        task = asyncio.create_task(follow(), name=f"copy-{seq}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run_chunk(self, chunk: list[tuple[Msg, BufferWrite, Span | None]]) -> None:
        for msg, _, _ in chunk:  # the heartbeat keeps them ours while their PubAcks are awaited
            self._held[id(msg)] = msg
        stored = [False] * len(chunk)
        try:
            stored = await self._pipeline.buffer_many([write for _, write, _ in chunk])
        finally:
            for msg, _, span in chunk:
                self._held.pop(id(msg), None)
                if span is not None:
                    span.end()
            for (msg, _, _), ok in zip(chunk, stored, strict=True):
                self._ended(msg, acked=ok)
        for (msg, _, _), ok in zip(chunk, stored, strict=True):
            # Not stored: JetStream redelivers the message a little later (the buffer's
            # Nats-Msg-Id keeps a stored-but-unconfirmed write from doubling).
            try:
                await (msg.ack() if ok else msg.nak(delay=2.0))
            except Exception as exc:  # noqa: BLE001 - unacked: redelivered, deduplicated
                log.debug("ack/nak failed: %s", exc)
            failpoints.hit("mid_intake_acks")  # some of the fetch acked, the rest not

    def _free_slots(self) -> int:
        return self._max_inflight - self.inflight

    async def unsubscribe(self) -> None:
        """After the pull loop was cancelled: release the consumer; in-flight items go on
        (see :meth:`drain`)."""
        if self._sub is not None:
            try:
                await self._sub.unsubscribe()
            except Exception:  # noqa: BLE001 - the connection may be closing already
                log.debug("intake unsubscribe failed", exc_info=True)
            self._sub = None

    def _intake(self, msg: Msg) -> Intake:
        meta = msg.metadata
        return Intake(
            raw=msg.data,
            handler=msg.subject.removeprefix(self._subjects.intake_prefix),
            subject=msg.subject,
            received_at=meta.timestamp.astimezone(UTC) if meta.timestamp else datetime.now(UTC),
            seq=meta.sequence.stream,
        )

    def _intake_span(self, msg: Msg, intake: Intake) -> Span | None:
        """The message's ``enrich.intake`` span (None when tracing is off), started as it
        is taken and ended when its next step is durable, on either path."""
        tracer = self._pipeline.tracer
        if not tracing.enabled(tracer):
            return None
        return tracer.start_span(
            "enrich.intake",
            context=tracing.extract(msg.headers),
            kind=SpanKind.CONSUMER,
            attributes={
                "messaging.system": "nats",
                "messaging.destination.name": msg.subject,
                "enrichd.intake_seq": intake.seq or 0,
            },
        )

    async def _start(self, msg: Msg, prepared: Prepared, span: Span | None) -> None:
        try:
            await self._slots.acquire()
        except BaseException:
            if span is not None:
                span.end()
            raise
        task = asyncio.create_task(self._run(msg, prepared, span), name=f"item-{prepared.intake.seq}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, msg: Msg, prepared: Prepared, span: Span | None) -> None:
        self._held[id(msg)] = msg
        intake = prepared.intake
        try:
            with _current(span, end=True):
                await self._process_until_done(prepared)
        except asyncio.CancelledError:  # shutdown: left unacked, redelivered to whoever runs next
            self._ended(msg, acked=False)
            raise
        except Exception:
            # Infrastructure failure (e.g. NATS publish timed out): the message is not
            # acked, JetStream redelivers it after a short delay.
            self._held.pop(id(msg), None)
            self._ended(msg, acked=False)
            log.exception("processing failed; message will be redelivered", extra={"seq": intake.seq})
            await quietly(msg.nak(delay=2.0))
            return
        finally:
            self._held.pop(id(msg), None)
            self._slots.release()
        self._ended(msg, acked=True)
        await quietly(msg.ack())

    async def _process_until_done(self, prepared: Prepared) -> None:
        """Process; when the pipeline says "not now" (budget spent), hold the message (the
        heartbeat keeps it ours) and pause pulling more, rather than NAK it: a NAK would
        count as a delivery and a day of waiting would exhaust ``max_deliver``."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self._pipeline.process(prepared)
                return
            except DeferError as exc:
                self._paused_until = max(self._paused_until, loop.time() + exc.delay_s)
                log.info(
                    "item waits",
                    extra={
                        "seq": prepared.intake.seq,
                        "delay_s": round(exc.delay_s, 1),
                        "reason": exc.reason,
                    },
                )
                await asyncio.sleep(exc.delay_s)

    async def heartbeats(self) -> None:
        """Long provider calls (retries, backoff, a budget wait) must not let ack_wait
        expire: one loop tells JetStream every held message is still in progress."""
        while True:
            await asyncio.sleep(max(0.5, self._ack_wait_s / 3))
            for msg in list(self._held.values()):
                await quietly(msg.in_progress())

    async def drain(self, timeout_s: float) -> int:
        """Wait for in-flight items; returns how many were still running at the deadline
        (they stay unacked and are redelivered to whoever runs next)."""
        pending: set[asyncio.Task[None]] = set()
        if self._tasks:
            _, pending = await asyncio.wait(set(self._tasks), timeout=timeout_s)
        unfinished = sum(self._chunks.get(task, 1) for task in pending)
        for task in pending:
            task.cancel()
        return unfinished

    @property
    def inflight(self) -> int:
        """Intake messages being worked on (each one of a buffer-write task counts)."""
        return len(self._tasks) - len(self._chunks) + sum(self._chunks.values())


def _current(span: Span | None, *, end: bool = False) -> AbstractContextManager[Any]:
    """``span`` as the current span (ended on exit when ``end``), or nothing."""
    return nullcontext() if span is None else trace.use_span(span, end_on_exit=end)
