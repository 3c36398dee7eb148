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
"""

from __future__ import annotations

import asyncio
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
from typing import TYPE_CHECKING, Any

from nats.aio.client import Client

from service import failpoints
from service.aio import reraise_if_cancelled
from service.core.entries import FileFormatError
from service.core.events import iso
from service.settings import Settings
from service.sinks.events import Redactor, dumps
from service.sources.folder_results import RETRY_S, ResultCollector
from service.sources.inbox_watch import InboxWatcher
from service.state import files
from service.state.files import ACCEPTED, PREPARED, READING, FileMeta, FileState, ReadConfig, display
from service.subjects import Subjects

if TYPE_CHECKING:
    from service.app import Daemon

log = logging.getLogger("enrichd.folders")
WORKERS = 2  # files read and published at the same time
CHUNK = 1000  # items published per PubAck round
Work = Callable[[], Awaitable[None]]


@dataclass(eq=False)
class Job:
    """A claimed file: its durable state, and the item ids whose results it still awaits."""

    meta: FileMeta
    state: FileState
    remaining: set[str] = field(default_factory=set)
    finishing: bool = False


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
        for folder in (self.inbox, self.outbox, self.root, self.processing):
            folder.mkdir(parents=True, exist_ok=True)
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

    async def _take(self, path: Path) -> None:
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
        job = Job(meta, FileState(self.root, key))
        try:
            await asyncio.to_thread(_claim, job, path)
        except FileNotFoundError:  # gone (or taken by another daemon) meanwhile
            await asyncio.to_thread(self._discard, job)
            return
        failpoints.hit("folder_claimed")
        await self._read(job)

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
            code = exc.code if isinstance(exc, FileFormatError) else "unreadable"
            if not isinstance(exc, FileFormatError | OSError):
                log.exception("reading a file failed", extra={"file": display(meta.rel)})
            self._fail(Path(meta.source), Path(meta.rel), meta.handler, code, str(exc))
            await asyncio.to_thread(self._discard, job)
            return
        self._jobs[meta.key] = job
        extra = {
            "file": display(meta.rel),
            "handler": meta.handler,
            "items": meta.records,
            "bad": meta.errors,
        }
        log.info("file read", extra=extra)
        await self._publish(job)

    def _fail(self, victim: Path, rel: Path, handler: str | None, code: str, message: str) -> None:
        try:
            target = files.move_into(self.inbox / ".failed", victim)
            files.write_error(target, rel=str(rel), handler=handler, code=code, message=message, at=_now())
        except OSError as exc:
            self._watcher.hold(victim)
            log.error("cannot move a refused file", extra={"file": display(str(rel)), "error": str(exc)})
            return
        extra = {"file": display(str(rel)), "code": code, "reason": display(message)}
        log.warning("file refused", extra=extra | {"moved_to": display(str(target))})

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
                    futures = []
                    for n, key, payload in chunk:
                        if key in done or key in job.remaining:  # answered, or repeated in this file
                            continue
                        self._results.expect(job, key)
                        headers = {"Nats-Msg-Id": f"{meta.key}:{n}"}
                        futures.append(await self._js.publish_async(subject, payload, headers=headers))
                    await _acked(futures)
                    failpoints.hit("folder_mid_publish")
            await self._publish_dlq(job)
        except Exception as exc:  # noqa: BLE001 - NATS trouble: try again later
            reraise_if_cancelled()
            self._results.forget(job)
            log.warning("publishing failed; will retry", extra={"file": display(meta.rel), "error": str(exc)})
            self._later(RETRY_S, partial(self._publish, job))
            return
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
                futures.append(await self._js.publish_async(subject, payload, headers=headers))
            await _acked(futures)

    # -- finishing ---------------------------------------------------------------------------

    def _check_done(self, job: Job) -> None:
        if job.meta.state == ACCEPTED and not job.remaining and not job.finishing:
            job.finishing = True
            self._spawn(self._finish(job))

    async def _finish(self, job: Job) -> None:
        """Source to .done/, results file, file.done event, state removed: each step is
        repeated harmlessly if a crash interrupts the sequence."""
        meta = job.meta
        try:
            await asyncio.to_thread(self._retire, job)  # first: a results file means all is done
            target = self._results_path(meta)
            counts = await asyncio.to_thread(files.write_results, job.state, target)
            event: dict[str, Any] = {"file": display(Path(meta.rel).name), "path": display(meta.rel)}
            moved = display(meta.moved_to) if meta.moved_to else None
            event |= {"handler": meta.handler} | counts
            event |= {"results": display(str(target)), "moved_to": moved, "at": iso(_now())}
            headers = {"Nats-Msg-Id": f"file.done:{meta.key}"}
            payload = self._redact(dumps(event)).encode()
            await self._js.publish(self.subjects.event("file.done"), payload, headers=headers, timeout=10)
            await asyncio.to_thread(job.state.remove)
        except Exception:  # noqa: BLE001 - e.g. outbox not writable: keep the state, try again
            reraise_if_cancelled()
            log.exception("finishing a file failed; will retry", extra={"file": display(meta.rel)})
            job.finishing = False
            self._later(RETRY_S * 6, partial(_call, self._check_done, job))
            return
        self._jobs.pop(meta.key, None)
        log.info("file done", extra={"file": display(meta.rel), "handler": meta.handler, **counts})

    def _results_path(self, meta: FileMeta) -> Path:
        rel = Path(meta.rel)
        inner = Path(*rel.parts[1:]) if len(rel.parts) > 1 else rel
        target = self.outbox / meta.handler / inner
        return target.with_name(target.name + ".results.jsonl")

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
            job = Job(meta, state)
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


async def attach(daemon: Daemon) -> FolderSource | None:
    """Start the folder source on a started daemon's NATS connection, once; None when
    ``folders.enabled`` is false. Stop it with ``await source.stop()`` before NATS closes."""
    existing: FolderSource | None = getattr(daemon, "folders", None)
    if existing is not None or not daemon.settings.folders.enabled:
        return existing
    broker = daemon._broker
    if broker is None:
        raise RuntimeError("attach() needs a started daemon")
    source = FolderSource(daemon.settings, daemon.subjects, broker.connection, daemon.redact)
    await source.start()
    setattr(daemon, "folders", source)  # noqa: B010 - Daemon may not declare it
    return source


def _claim(job: Job, path: Path) -> None:
    job.state.dir.mkdir(parents=True, exist_ok=True)
    job.state.save(job.meta)  # first, so that after a crash the rename can be traced
    source = Path(job.meta.source)
    source.parent.mkdir(parents=True, exist_ok=True)
    os.rename(path, source)


async def _acked(futures: list[asyncio.Future[Any]]) -> None:
    if not futures:
        return
    results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(futures)} publishes were not acknowledged: {failed[0]!r}")


def _now() -> datetime:
    return datetime.now(UTC)


async def _call(fn: Callable[[Job], None], job: Job) -> None:
    fn(job)
