"""What a claimed file sends to NATS (steps 4 and 6 of :mod:`service.sources.folders`):
its items to intake with ``Nats-Msg-Id: <key>:<n>`` (each PubAck's intake seq recorded in
its state, durably), the DLQ entries of its records that failed locally, and
``enrich.events.file.done``. Every publish is safe to repeat: the message ids are the
same, so JetStream drops what it has."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import nats.errors
from nats.js import JetStreamContext

from service import failpoints
from service.contract.subjects import Subjects
from service.core.events import fitted_entry, iso
from service.core.redact import Redactor
from service.sinks.events import dumps
from service.sources.folders.job import Job
from service.sources.folders.read import entry_json
from service.state.folder_files import read_chunk
from service.state.safe_paths import display

CHUNK = 1000  # items published per PubAck round
# NATS being away is waited out (the file stays `prepared`, visible in `enrichd status`):
CONNECTION_ERRORS = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
)


class FilePublisher:
    """Publishes for claimed files; ``expect(job, item_id)`` is told of each item before
    it is published (the result collector's index)."""

    def __init__(
        self,
        js: JetStreamContext,
        subjects: Subjects,
        redact: Redactor,
        max_payload: int,
        expect: Callable[[Job, str], None],
    ) -> None:
        self._js, self._subjects, self._redact = js, subjects, redact
        self._max_payload = max_payload
        self._expect = expect

    async def items(self, job: Job) -> None:
        """Publish every item of the manifest not answered yet (nor repeated in the file),
        recording the intake seq of each; raises when a publish is not acknowledged (a
        connection error as itself, see :data:`CONNECTION_ERRORS`)."""
        meta = job.meta
        subject = self._subjects.intake_prefix + meta.handler
        done = await asyncio.to_thread(job.state.spooled)
        with job.state.manifest.open("rb") as f:
            while chunk := await asyncio.to_thread(read_chunk, f, CHUNK):
                futures, keys = [], []
                for n, key, payload in chunk:
                    if key in done or key in job.remaining:  # answered, or repeated in this file
                        continue
                    self._expect(job, key)
                    headers = {"Nats-Msg-Id": f"{meta.key}:{n}"}
                    futures.append(await self._js.publish_async(subject, payload, headers=headers))
                    keys.append(key)
                acks = await acked(futures)
                # a duplicate's PubAck names the message intake kept: that is the one answered
                seqs = [(key, int(ack.seq)) for key, ack in zip(keys, acks, strict=True)]
                await asyncio.to_thread(job.state.record_intake, seqs)
                if job.seqs is not None:
                    job.seqs.update(seqs)
                failpoints.hit("folder_mid_publish")

    async def dlq(self, job: Job) -> None:
        """The DLQ entries of the file's records that failed locally (redacted, bounded)."""
        if not job.meta.errors:
            return
        subject = self._subjects.dlq(job.meta.handler)
        lines = (await asyncio.to_thread(job.state.dlq.read_bytes)).splitlines()
        for start in range(0, len(lines), CHUNK):
            futures = []
            for n, line in enumerate(lines[start : start + CHUNK], start + 1):
                headers = {"Nats-Msg-Id": f"{job.meta.handler}:dlq:file:{job.meta.key}:{n}"}
                payload = self._redact(line.decode()).encode()
                if len(payload) > self._max_payload - 1024:  # redaction made it longer
                    payload = fitted_entry(json.loads(payload), entry_json, self._max_payload - 1024)
                futures.append(await self._js.publish_async(subject, payload, headers=headers))
            await acked(futures)

    async def done(self, job: Job, results: Path, at: datetime) -> None:
        """``enrich.events.file.done`` for a file whose results file ``results`` is
        written (redacted): its names, handler, counts by outcome, where it went."""
        meta = job.meta
        event: dict[str, Any] = {"file": display(Path(meta.rel).name), "path": display(meta.rel)}
        moved = display(meta.moved_to) if meta.moved_to else None
        event |= {"handler": meta.handler} | job.counts
        event |= {"results": display(str(results)), "moved_to": moved, "at": iso(at)}
        headers = {"Nats-Msg-Id": f"file.done:{job.meta.key}"}
        payload = self._redact(dumps(event)).encode()
        await self._js.publish(self._subjects.event("file.done"), payload, headers=headers, timeout=10)


async def acked(futures: list[asyncio.Future[Any]]) -> list[Any]:
    """The PubAcks; raises the first failure (a connection error as itself)."""
    if not futures:
        return []
    results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        if isinstance(failed[0], CONNECTION_ERRORS):
            raise failed[0]
        raise RuntimeError(f"{len(failed)} of {len(futures)} publishes were not acknowledged: {failed[0]!r}")
    return results
