"""The results collector of the folder source (step 5, *collect*, of the life of a file in
:mod:`service.sources.folders`): :class:`ResultCollector`, a durable pull consumer on
``<prefix>.out.>`` that spools each result a claimed file awaits (fsync, then ack).

A result belongs to a file when it answers the intake message that file published (its
``Enrichd-Intake-Seq`` header, or the ``:cached:``/``:error:``/``:dup:<seq>`` suffix of
its ``Nats-Msg-Id``), not merely when it carries an id the file awaits: two files with the
same content publish the same ids, and each gets its own event (the second a ``cached``
copy with its own metadata, source and times)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from service.aio import quietly, reraise_if_cancelled
from service.contract.subjects import Subjects
from service.sinks.events import INTAKE_SEQ_HEADER
from service.sources.folders.job import Job

log = logging.getLogger("enrichd.folders")
FETCH = 500  # result events per pull
RESULTS_ACK_WAIT_S = 10.0
RETRY_S = 5.0
DEFER_S = 1.0  # a result that came before its intake PubAck: redelivered after this
_SEQ_KINDS = ("cached", "error", "dup")


class ResultCollector:
    """A durable pull consumer on ``<prefix>.out.>`` that spools, durably and then acks,
    every result event some file awaits; calls ``on_progress(job)`` for each file that
    received results. The index maps (handler, item id) to the files awaiting it."""

    def __init__(
        self, js: JetStreamContext, subjects: Subjects, durable: str, on_progress: Callable[[Job], None]
    ) -> None:
        self._js, self._subjects, self._durable = js, subjects, durable
        self._on_progress = on_progress
        self._pending: dict[str, dict[str, list[Job]]] = {}  # handler → item id → jobs
        self._sub: Any = None

    def expect(self, job: Job, key: str) -> None:
        jobs = self._pending.setdefault(job.meta.handler, {}).setdefault(key, [])
        if job not in jobs:
            jobs.append(job)
        job.remaining.add(key)

    def received(self, job: Job, key: str) -> None:
        job.remaining.discard(key)
        ids = self._pending.get(job.meta.handler, {})
        jobs = ids.get(key)
        if jobs is not None and job in jobs:
            jobs.remove(job)
            if not jobs:
                del ids[key]

    def forget(self, job: Job) -> None:
        for key in list(job.remaining):
            self.received(job, key)

    async def bind(self, since: str | None) -> None:
        """Create the consumer if missing: from now, or from ``since`` when files were
        waiting (the consumer was lost, e.g. a new NATS server) so their results come."""
        stream = self._subjects.stream("OUT")
        try:
            await self._js.consumer_info(stream, self._durable)
        except nats.js.errors.NotFoundError:
            config = ConsumerConfig(
                durable_name=self._durable,
                ack_policy=AckPolicy.EXPLICIT,
                ack_wait=RESULTS_ACK_WAIT_S,
                filter_subject=f"{self._subjects.prefix}.out.>",
                inactive_threshold=30 * 86_400.0,
                deliver_policy=DeliverPolicy.NEW,
            )
            if since is not None:
                config.deliver_policy = DeliverPolicy.BY_START_TIME
                start = datetime.fromisoformat(since.replace("Z", "+00:00"))
                config.opt_start_time = start - timedelta(minutes=1)
            await self._js.add_consumer(stream, config)
        self._sub = await self._js.pull_subscribe_bind(durable=self._durable, stream=stream)

    async def run(self) -> None:
        while True:
            reraise_if_cancelled()  # a cancel swallowed by a fetch that returned messages
            try:
                msgs = await self._sub.fetch(FETCH, timeout=1.0)
            except (TimeoutError, nats.errors.TimeoutError):
                reraise_if_cancelled()  # 3.11's wait_for can turn a cancel into a timeout
                continue
            except nats.errors.Error as exc:
                # Closed or reconnecting, or JetStream not available (503) while NATS is
                # down: retry; this loop must outlive an outage (a dead one stops the daemon).
                reraise_if_cancelled()  # nats-py reports a cancel while closing as ConnectionClosed
                log.warning("results fetch failed; retrying", extra={"error": str(exc)})
                await asyncio.sleep(1.0)
                continue
            try:
                later = await self._collect(msgs)
            except Exception:  # noqa: BLE001 - e.g. disk full: not acked, so redelivered
                reraise_if_cancelled()
                log.exception("storing results failed; they will be redelivered")
                await asyncio.sleep(RETRY_S)
                continue
            for msg in msgs:
                await quietly(msg.nak(delay=DEFER_S) if id(msg) in later else msg.ack())

    async def close(self) -> None:
        if self._sub is not None:
            await quietly(self._sub.unsubscribe())
            self._sub = None

    async def _collect(self, msgs: list[Msg]) -> set[int]:
        """Spool what the files await; returns the ``id()`` of the messages to see again
        later (a file awaits that id but does not know yet which intake message is its own)."""
        prefix = self._subjects.prefix + ".out."
        batch: dict[Job, list[tuple[str, bytes]]] = {}
        later: set[int] = set()
        for msg in msgs:
            ids = self._pending.get(msg.subject.removeprefix(prefix))
            item_id = _event_id(msg.data) if ids else None
            jobs = ids.get(item_id, ()) if ids and item_id else ()
            if not jobs or item_id is None:
                continue
            seq = answered_seq(msg.headers)
            for job in jobs:
                if item_id not in job.remaining:
                    continue
                verdict = belongs(job.seqs, item_id, seq)
                if verdict is None:
                    later.add(id(msg))
                elif verdict:
                    batch.setdefault(job, []).append((item_id, msg.data))
        if batch:
            await asyncio.to_thread(_spool, batch)
        for job, lines in batch.items():
            for key, _ in lines:
                self.received(job, key)
            self._on_progress(job)
        return later


def belongs(seqs: dict[str, int] | None, item_id: str, seq: int | None) -> bool | None:
    """Whether a result event for ``item_id`` answering intake message ``seq`` is the
    file's own: True, False, or None (not known yet: the file's PubAck for that item has
    not been recorded). ``seqs`` None (a state from before intake seqs were recorded) and
    an event that names no intake message match by id alone."""
    if seqs is None or seq is None:
        return True
    mine = seqs.get(item_id)
    if mine is None:
        return None
    return mine == seq


def answered_seq(headers: dict[str, str] | None) -> int | None:
    """The intake stream seq a result event answers: its ``Enrichd-Intake-Seq`` header,
    else the ``<id>:<handler>:cached|error|dup:<seq>`` form of its Nats-Msg-Id."""
    if not headers:
        return None
    value = headers.get(INTAKE_SEQ_HEADER)
    if value is not None and value.isdigit():
        return int(value)
    parts = headers.get("Nats-Msg-Id", "").rsplit(":", 2)
    if len(parts) == 3 and parts[1] in _SEQ_KINDS and parts[2].isdigit():
        return int(parts[2])
    return None


def _spool(batch: dict[Job, list[tuple[str, bytes]]]) -> None:
    for job, lines in batch.items():
        job.state.append(lines)


def _event_id(data: bytes) -> str | None:
    try:
        value = json.loads(data).get("id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
