"""The results collector of the folder source (step 5, *collect*, of the life of a file in
:mod:`service.sources.folder_source`): :class:`ResultCollector`, a durable pull consumer on
``<prefix>.out.>`` that spools each result a claimed file awaits (fsync, then ack)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from service.aio import quietly, reraise_if_cancelled
from service.subjects import Subjects

if TYPE_CHECKING:
    from service.sources.folder_source import Job

log = logging.getLogger("enrichd.folders")
FETCH = 500  # result events per pull
RESULTS_ACK_WAIT_S = 10.0
RETRY_S = 5.0


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
            except (nats.errors.ConnectionClosedError, nats.errors.ConnectionReconnectingError) as exc:
                reraise_if_cancelled()  # nats-py reports a cancel while closing as ConnectionClosed
                log.warning("results fetch failed; retrying", extra={"error": str(exc)})
                await asyncio.sleep(1.0)
                continue
            try:
                await self._collect(msgs)
            except Exception:  # noqa: BLE001 - e.g. disk full: not acked, so redelivered
                reraise_if_cancelled()
                log.exception("storing results failed; they will be redelivered")
                await asyncio.sleep(RETRY_S)
                continue
            for msg in msgs:
                await quietly(msg.ack())

    async def close(self) -> None:
        if self._sub is not None:
            await quietly(self._sub.unsubscribe())
            self._sub = None

    async def _collect(self, msgs: list[Any]) -> None:
        prefix = self._subjects.prefix + ".out."
        batch: dict[Job, list[tuple[str, bytes]]] = {}
        for msg in msgs:
            ids = self._pending.get(msg.subject.removeprefix(prefix))
            item_id = _event_id(msg.data) if ids else None
            for job in ids.get(item_id, ()) if ids and item_id else ():
                if item_id in job.remaining:
                    batch.setdefault(job, []).append((item_id, msg.data))
        if not batch:
            return
        await asyncio.to_thread(_spool, batch)
        for job, lines in batch.items():
            for key, _ in lines:
                self.received(job, key)
            self._on_progress(job)


def _spool(batch: dict[Job, list[tuple[str, bytes]]]) -> None:
    for job, lines in batch.items():
        job.state.append(lines)


def _event_id(data: bytes) -> str | None:
    try:
        value = json.loads(data).get("id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
