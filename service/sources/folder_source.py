"""Watched folders (CONTRACT §7): files dropped into ``folders.inbox`` become items on
``enrich.in.<handler>`` (same routing, batching and durability as NATS items), and their
results come back as ``outbox/<handler>/<name>.results.jsonl``.

The life of one file (docs/folders.md has the crash analysis):
1. *settle* (:class:`~service.sources.inbox_watch.InboxWatcher`): watchfiles or a scan
   reports it; it is taken once unchanged for ``folders.settle_s`` (a file that is
   already older is taken at once).
2. *claim*: refused (→ ``inbox/.failed/``) if any part of its path is a symlink, it is not
   a regular file, too large, empty, or its subfolder is no handler; else its state is
   saved and it is renamed into ``inbox/.processing/<key>/``, out of everyone's way.
3. *read* (thread): items validated into a manifest, bad records spooled as error events.
4. *publish*: items to intake with ``Nats-Msg-Id: <key>:<n>``; ``accepted`` once all acked.
5. *collect* (:class:`~service.sources.folder_results.ResultCollector`): a durable pull
   consumer on ``<prefix>.out.>`` spools each awaited result (fsync, then ack).
6. *finish*: the source to ``inbox/.done/``, the results file in input order (atomic),
   ``enrich.events.file.done``.

Every step that fails is retried with a backoff and a bounded number of attempts
(:data:`TEMPORARY_ATTEMPTS` for a disk full or an I/O error, :data:`OTHER_ATTEMPTS`
otherwise); then the file goes to ``inbox/.failed/`` with a reason, so every dropped file
ends in results or in ``.failed/`` in bounded time.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import shutil
import stat
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

import nats.errors
from nats.aio.client import Client

from service import failpoints
from service.aio import reraise_if_cancelled
from service.contract.subjects import Subjects
from service.core.entries import FileFormatError
from service.core.events import iso
from service.core.redact import Redactor
from service.settings import Settings
from service.sinks.events import dumps
from service.sources.folder_results import RETRY_S, ResultCollector
from service.sources.inbox_watch import InboxWatcher
from service.state import files
from service.state.files import (
    ACCEPTED,
    PREPARED,
    READING,
    STATE_DIR_MODE,
    FileMeta,
    FileState,
    ReadConfig,
    UnsafePathError,
    display,
    temporary,
)

log = logging.getLogger("enrichd.folders")
WORKERS = 2  # files read and published at the same time
CHUNK = 1000  # items published per PubAck round
RETRY_BASE_S = 2.0  # first wait after a failed step; doubles up to RETRY_MAX_S
RETRY_MAX_S = 300.0
TEMPORARY_ATTEMPTS = 12  # a step failing with a temporary OS error (about 25 min in all)
OTHER_ATTEMPTS = 4  # a step failing otherwise
DONE_EVENT_ATTEMPTS = 6  # file.done after the results file is written: then logged and dropped
# NATS being away is waited out (the file stays `prepared`, visible in `enrichd status`):
_CONNECTION_ERRORS = (
    nats.errors.ConnectionClosedError,
    nats.errors.ConnectionReconnectingError,
    nats.errors.NoServersError,
    nats.errors.StaleConnectionError,
    nats.errors.OutboundBufferLimitError,
)
Work = Callable[[], Awaitable[None]]


@dataclass(eq=False)
class Job:
    """A claimed file: its durable state, and the item ids whose results it still awaits."""

    meta: FileMeta
    state: FileState
    remaining: set[str] = field(default_factory=set)
    # item id → the intake seq of the message this file published for it (its result
    # answers that one); None: an older state without intake seqs, results match by id
    seqs: dict[str, int] | None = field(default_factory=dict)
    finishing: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    failures: int = 0  # of the current step, for the bounded retries
    written: bool = False  # the results file is written (finish: only file.done is left)


class FolderSource:
    """Watches ``folders.inbox``; ``await start()``, ``await stop()``, ``progress()``."""

    def __init__(self, settings: Settings, subjects: Subjects, nc: Client, redact: Redactor) -> None:
        self.cfg = settings.folders
        self.registry = settings.registry
        self.subjects = subjects
        self.inbox = self.cfg.inbox.resolve()
        self.outbox = self.cfg.outbox.resolve()
        self.root = settings.state_dir.resolve() / "folders"
        self.processing = self.inbox / ".processing"
        self._redact = redact
        self._js = nc.jetstream(publish_async_max_pending=4 * CHUNK)
        self._max_payload = nc.max_payload
        self._max_item_bytes = min(settings.limits.max_item_bytes, nc.max_payload - 1024)
        self._tokens_param = settings.openai.max_tokens_param
        self._watcher = InboxWatcher(self.inbox, self.outbox, self.cfg.settle_s, self._ready)
        # One consumer per installation: every daemon must see every result of its own files.
        durable = f"{settings.nats.consumer}_folders_{settings.instance}"
        self._results = ResultCollector(self._js, subjects, durable, self._check_done)
        self._jobs: dict[str, Job] = {}
        self._queue: asyncio.Queue[Work] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()
        self._stop = asyncio.Event()

    async def start(self) -> None:
        """Resume unfinished files, bind the results consumer, start watching."""
        for folder in (self.inbox, self.outbox):
            folder.mkdir(parents=True, exist_ok=True)
        for folder in (self.root, self.processing):
            folder.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        resume = await self._recover()
        await self._results.bind(min((job.meta.received_at for job in self._jobs.values()), default=None))
        self._spawn(self._results.run())
        for _ in range(WORKERS):
            self._spawn(self._worker())
        for work in resume:
            self._queue.put_nowait(work)
        self._spawn(self._watcher.run(self._stop))
        log.info("watching folder", extra={"inbox": str(self.inbox), "outbox": str(self.outbox)})

    async def stop(self) -> None:
        """Stop watching and working (idempotent); unfinished files resume at the next start."""
        self._stop.set()
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self._results.close()

    def progress(self) -> list[dict[str, Any]]:
        """Per claimed file: name, handler, state, total (records) and done (results in)."""
        out = []
        for job in self._jobs.values():
            meta = job.meta
            done = meta.records - len(job.remaining) if meta.state == ACCEPTED else meta.errors
            out.append(
                {"file": display(meta.rel), "handler": meta.handler, "state": meta.state}
                | {"total": meta.records, "done": max(0, done), "received_at": meta.received_at}
            )
        return out

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _retry(self, job: Job, exc: BaseException, work: Work, step: str) -> bool:
        """Schedule ``work`` again after a backoff; False when the step has failed too
        often (then the caller gives the file up)."""
        job.failures += 1
        limit = TEMPORARY_ATTEMPTS if temporary(exc) else OTHER_ATTEMPTS
        extra = {"file": display(job.meta.rel), "error": display(str(exc)), "attempt": job.failures}
        if job.failures >= limit:
            log.error(f"{step} failed {job.failures} times; giving the file up", extra=extra)
            return False
        delay = min(RETRY_BASE_S * 2 ** (job.failures - 1), RETRY_MAX_S)
        log.warning(f"{step} failed; will retry", extra=extra | {"retry_in_s": delay})
        self._later(delay, work)
        return True

    def _later(self, delay_s: float, work: Work) -> None:
        async def wait() -> None:
            await asyncio.sleep(delay_s)
            self._queue.put_nowait(work)

        self._spawn(wait())

    async def _worker(self) -> None:
        while True:
            reraise_if_cancelled()
            work = await self._queue.get()
            try:
                await work()
            except Exception:  # noqa: BLE001 - one file must never stop the daemon
                reraise_if_cancelled()
                log.exception("folder work failed")

    # -- claiming and reading ----------------------------------------------------------------

    def _ready(self, path: Path) -> None:
        self._queue.put_nowait(partial(self._take, path))

    async def _take(self, path: Path, failures: int = 0) -> None:
        self._watcher.taken(path)
        rel = path.relative_to(self.inbox)
        try:
            handler, victim, refusal = self._check(path, rel)
        except FileNotFoundError:
            return
        if refusal is not None:
            self._fail(victim, victim.relative_to(self.inbox), handler, refusal.code, str(refusal))
            return
        key = f"{time.time_ns():x}-{secrets.token_hex(3)}"
        meta = FileMeta(key, str(rel), handler, str(self.processing / key / path.name), iso(_now()), READING)
        job = Job(meta, FileState(self.root, key), failures=failures)
        try:
            await asyncio.to_thread(_claim, job, path)
        except FileNotFoundError:  # gone (or taken by another daemon) meanwhile
            await asyncio.to_thread(self._discard, job)
            return
        except OSError as exc:  # e.g. the state disk is full: the file stays in the inbox
            await asyncio.to_thread(self._discard, job)
            self._watcher.hold(path)  # no rescan meanwhile: this retry is the one
            if not self._retry(job, exc, partial(self._retake, path, job.failures + 1), "claiming a file"):
                self._watcher.release(path)
                self._fail(path, rel, handler, "io_error", f"cannot claim the file: {exc}")
            return
        failpoints.hit("folder_claimed")
        await self._read(job)

    async def _retake(self, path: Path, failures: int) -> None:
        self._watcher.release(path)
        await self._take(path, failures)

    def _check(self, path: Path, rel: Path) -> tuple[str, Path, FileFormatError | None]:
        """(handler, the path to act on, why it is refused or None)."""
        handler = rel.parts[0] if len(rel.parts) > 1 else self.cfg.default_handler
        current = self.inbox
        for part in rel.parts:
            current = current / part
            st = os.lstat(current)
            if stat.S_ISLNK(st.st_mode):  # never followed: the link itself is moved away
                return handler, current, FileFormatError("symbolic links are not followed", "symlink")
        if handler not in self.registry:
            message = f"no handler named {handler!r}; known: {', '.join(sorted(self.registry))}"
            return handler, path, FileFormatError(message, "unknown_handler")
        try:
            files.check_regular(st, self.cfg.max_file_bytes)
        except FileFormatError as exc:
            return handler, path, exc
        return handler, path, None

    def _discard(self, job: Job) -> None:
        job.state.remove()
        shutil.rmtree(self.processing / job.meta.key, ignore_errors=True)

    async def _read(self, job: Job) -> None:
        meta = job.meta
        cfg = ReadConfig(
            spec=self.registry[meta.handler],
            default_priority=self.cfg.default_priority,
            max_item_bytes=self._max_item_bytes,
            max_tokens_param=self._tokens_param,
            intake_subject=self.subjects.intake_prefix + meta.handler,
        )
        try:
            await asyncio.to_thread(files.prepare, job.state, meta, cfg, self.cfg.max_file_bytes)
        except Exception as exc:  # noqa: BLE001 - whatever it is, this file fails, not the daemon
            reraise_if_cancelled()
            if temporary(exc):  # a full disk, an I/O error: not the file's fault, read it later
                if self._retry(job, exc, partial(self._read, job), "reading a file"):
                    return
                code = "io_error"
            else:
                code = exc.code if isinstance(exc, FileFormatError) else "unreadable"
            if not isinstance(exc, FileFormatError | OSError):
                log.exception("reading a file failed", extra={"file": display(meta.rel)})
            self._fail(Path(meta.source), Path(meta.rel), meta.handler, code, str(exc))
            await asyncio.to_thread(self._discard, job)
            return
        job.failures = 0
        self._jobs[meta.key] = job
        extra = {
            "file": display(meta.rel),
            "handler": meta.handler,
            "items": meta.records,
            "bad": meta.errors,
        }
        log.info("file read", extra=extra)
        await self._publish(job)

    def _fail(self, victim: Path, rel: Path, handler: str | None, code: str, message: str) -> Path | None:
        """Move a file to ``inbox/.failed/`` beside ``<name>.error.json``; where it went."""
        try:
            target = files.move_into(self.inbox / ".failed", victim)
        except OSError as exc:
            self._watcher.hold(victim)
            log.error("cannot move a refused file", extra={"file": display(str(rel)), "error": str(exc)})
            return None
        extra = {"file": display(str(rel)), "code": code, "reason": display(message)}
        try:
            files.write_error(target, rel=str(rel), handler=handler, code=code, message=message, at=_now())
        except OSError as exc:  # the file is in .failed/; its reason is in the log
            log.error("cannot write the error file of a refused file", extra=extra | {"error": str(exc)})
        log.warning("file refused", extra=extra | {"moved_to": display(str(target))})
        return target

    # -- publishing --------------------------------------------------------------------------

    async def _publish(self, job: Job) -> None:
        """Publish every item not answered yet; ``accepted`` once intake acked them all.
        Safe to repeat: the message ids are the same, so intake drops what it has."""
        meta = job.meta
        subject = self.subjects.intake_prefix + meta.handler
        try:
            done = await asyncio.to_thread(job.state.spooled)
            with job.state.manifest.open("rb") as f:
                while chunk := await asyncio.to_thread(files.read_chunk, f, CHUNK):
                    futures, keys = [], []
                    for n, key, payload in chunk:
                        if key in done or key in job.remaining:  # answered, or repeated in this file
                            continue
                        self._results.expect(job, key)
                        headers = {"Nats-Msg-Id": f"{meta.key}:{n}"}
                        futures.append(await self._js.publish_async(subject, payload, headers=headers))
                        keys.append(key)
                    acks = await _acked(futures)
                    # a duplicate's PubAck names the message intake kept: that is the one answered
                    seqs = [(key, int(ack.seq)) for key, ack in zip(keys, acks, strict=True)]
                    await asyncio.to_thread(job.state.record_intake, seqs)
                    if job.seqs is not None:
                        job.seqs.update(seqs)
                    failpoints.hit("folder_mid_publish")
            await self._publish_dlq(job)
        except Exception as exc:  # noqa: BLE001 - NATS trouble: try again later
            reraise_if_cancelled()
            self._results.forget(job)
            work = partial(self._publish, job)
            if isinstance(exc, _CONNECTION_ERRORS):
                log.warning(
                    "publishing failed; will retry", extra={"file": display(meta.rel), "error": str(exc)}
                )
                self._later(RETRY_S, work)
            elif not self._retry(job, exc, work, "publishing a file's items"):
                await self._abandon(job, "publish_failed", f"its items could not be published: {exc}")
            return
        job.failures = 0
        meta.state = ACCEPTED
        await asyncio.to_thread(job.state.save, meta)
        failpoints.hit("folder_accepted")
        log.info("file accepted", extra={"file": display(meta.rel), "waiting": len(job.remaining)})
        self._check_done(job)

    async def _publish_dlq(self, job: Job) -> None:
        if not job.meta.errors:
            return
        subject = self.subjects.dlq(job.meta.handler)
        lines = (await asyncio.to_thread(job.state.dlq.read_bytes)).splitlines()
        for start in range(0, len(lines), CHUNK):
            futures = []
            for n, line in enumerate(lines[start : start + CHUNK], start + 1):
                headers = {"Nats-Msg-Id": f"{job.meta.handler}:dlq:file:{job.meta.key}:{n}"}
                payload = self._redact(line.decode()).encode()
                if len(payload) > self._max_payload - 1024:  # redaction made it longer
                    payload = files.bound_dlq(json.loads(payload), self._max_payload - 1024)
                futures.append(await self._js.publish_async(subject, payload, headers=headers))
            await _acked(futures)

    # -- finishing ---------------------------------------------------------------------------

    def _check_done(self, job: Job) -> None:
        if job.meta.state == ACCEPTED and not job.remaining and not job.finishing:
            job.finishing = True
            self._spawn(self._finish(job))

    async def _finish(self, job: Job) -> None:
        """Source to .done/, results file, file.done event, state removed: each step is
        repeated harmlessly if a crash interrupts the sequence. A results file that cannot
        be written (bounded retries; at once for a symbolic link in the outbox) sends the
        file to .failed/ with its results beside it."""
        meta = job.meta
        root, parts, name = self._results_place(meta)
        target = root.joinpath(*parts, name)
        if not job.written:
            try:
                await asyncio.to_thread(self._retire, job)  # first: a results file means all is done
                counts = await asyncio.to_thread(files.write_results, job.state, root, parts, name)
            except Exception as exc:  # noqa: BLE001 - e.g. outbox not writable: keep the state, try again
                reraise_if_cancelled()
                job.finishing = False
                if isinstance(exc, UnsafePathError):
                    await self._abandon(job, "unsafe_outbox", str(exc))
                elif not self._retry(job, exc, partial(_call, self._check_done, job), "writing results"):
                    await self._abandon(
                        job, "results_unwritable", f"cannot write {display(str(target))}: {exc}"
                    )
                return
            job.written, job.failures, job.counts = True, 0, counts
        counts = job.counts
        event: dict[str, Any] = {"file": display(Path(meta.rel).name), "path": display(meta.rel)}
        moved = display(meta.moved_to) if meta.moved_to else None
        event |= {"handler": meta.handler} | counts
        event |= {"results": display(str(target)), "moved_to": moved, "at": iso(_now())}
        try:
            headers = {"Nats-Msg-Id": f"file.done:{meta.key}"}
            payload = self._redact(dumps(event)).encode()
            await self._js.publish(self.subjects.event("file.done"), payload, headers=headers, timeout=10)
        except Exception as exc:  # noqa: BLE001 - the results are written: only the event is late
            reraise_if_cancelled()
            job.failures += 1
            if job.failures < DONE_EVENT_ATTEMPTS:
                log.warning("publishing file.done failed; will retry", extra={"file": display(meta.rel)})
                job.finishing = False
                self._later(
                    min(RETRY_BASE_S * 2**job.failures, RETRY_MAX_S), partial(_call, self._check_done, job)
                )
                return
            log.error(
                "file.done could not be published; the results file is written",
                extra={"file": display(meta.rel), "error": str(exc)},
            )
        await asyncio.to_thread(job.state.remove)
        self._jobs.pop(meta.key, None)
        log.info("file done", extra={"file": display(meta.rel), "handler": meta.handler, **counts})

    async def _abandon(self, job: Job, code: str, message: str) -> None:
        """Give a claimed file up: the source (from .processing/ or .done/) to .failed/
        with the reason, the results received so far beside it when they can be written
        there, the state removed."""
        meta = job.meta
        complete = meta.state == ACCEPTED and not job.remaining
        self._results.forget(job)
        source = Path(meta.moved_to) if meta.moved_to else Path(meta.source)
        target = self._fail(source, Path(meta.rel), meta.handler, code, message)
        if target is not None and complete:
            name = files.fit_name(target.name, ".results.jsonl")
            try:
                await asyncio.to_thread(files.write_results, job.state, target.parent, (), name)
            except Exception as exc:  # noqa: BLE001 - the reason is written; the results are lost
                reraise_if_cancelled()
                log.error("cannot save the results beside the failed file", extra={"error": str(exc)})
        await asyncio.to_thread(self._discard, job)
        self._jobs.pop(meta.key, None)

    def _results_place(self, meta: FileMeta) -> tuple[Path, tuple[str, ...], str]:
        """Where the results file goes: (outbox/<handler>, the folders below, its name)
        — a name that would pass 255 bytes is shortened (files.fit_name)."""
        rel = Path(meta.rel)
        inner = rel.parts[1:] if len(rel.parts) > 1 else rel.parts
        return self.outbox, (meta.handler, *inner[:-1]), files.fit_name(inner[-1], ".results.jsonl")

    def _retire(self, job: Job) -> None:
        source = Path(job.meta.source)
        if job.meta.moved_to is None and os.path.lexists(source):
            job.meta.moved_to = str(files.move_into(self.inbox / ".done", source))
            job.state.save(job.meta)
        shutil.rmtree(source.parent, ignore_errors=True)

    # -- recovery ----------------------------------------------------------------------------

    async def _recover(self) -> list[Work]:
        """Rebuild what was in flight at the last stop or crash; returns work to resume."""
        resume: list[Work] = []
        keys = {p.name for p in self.root.iterdir() if p.is_dir()}
        keys |= {p.name for p in self.processing.iterdir() if p.is_dir()}
        for key in sorted(keys):
            state = FileState(self.root, key)
            meta = state.load()
            if meta is None:
                await asyncio.to_thread(self._orphan, key)
                continue
            seqs = await asyncio.to_thread(state.intake_seqs)
            job = Job(meta, state, seqs=seqs if meta.state == ACCEPTED else seqs or {})
            if meta.state == READING:
                if await asyncio.to_thread(os.path.lexists, meta.source):
                    resume.append(partial(self._read, job))
                else:  # the rename never happened: the scan finds the file in the inbox again
                    await asyncio.to_thread(self._discard, job)
                continue
            self._jobs[key] = job
            if meta.state == PREPARED:
                resume.append(partial(self._publish, job))
                continue
            for item_id in await asyncio.to_thread(state.waiting):
                self._results.expect(job, item_id)
            self._check_done(job)
        if keys:
            log.info("resuming files", extra={"files": len(keys), "waiting": len(self._jobs)})
        return resume

    def _orphan(self, key: str) -> None:
        """Files under .processing whose state is gone (the state dir was wiped)."""
        folder = self.processing / key
        for path in folder.iterdir() if folder.is_dir() else ():
            message = "the daemon lost track of this file (state directory removed); drop it again"
            self._fail(path, Path(path.name), None, "state_lost", message)
        shutil.rmtree(folder, ignore_errors=True)
        FileState(self.root, key).remove()


def _claim(job: Job, path: Path) -> None:
    job.state.make()
    job.state.save(job.meta)  # first, so that after a crash the rename can be traced
    source = Path(job.meta.source)
    source.parent.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
    os.rename(path, source)


async def _acked(futures: list[asyncio.Future[Any]]) -> list[Any]:
    """The PubAcks; raises the first failure (a connection error as itself)."""
    if not futures:
        return []
    results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        if isinstance(failed[0], _CONNECTION_ERRORS):
            raise failed[0]
        raise RuntimeError(f"{len(failed)} of {len(futures)} publishes were not acknowledged: {failed[0]!r}")
    return results


def _now() -> datetime:
    return datetime.now(UTC)


async def _call(fn: Callable[[Job], None], job: Job) -> None:
    fn(job)
