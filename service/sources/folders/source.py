"""The folder source (:mod:`service.sources.folders` has the life of a file): claims what
the watcher reports, reads it, publishes its items, and finishes it once the collector
has all its results — or gives it up to ``inbox/.failed/`` after bounded retries. At
start it resumes what was in flight at the last stop or crash."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import Any

from nats.aio.client import Client

from service import failpoints
from service.aio import reraise_if_cancelled
from service.contract.subjects import Subjects
from service.core.entries import FileFormatError
from service.core.events import iso
from service.core.redact import Redactor
from service.settings import Settings
from service.sources.folders import claim
from service.sources.folders.job import Job
from service.sources.folders.publish import CHUNK, CONNECTION_ERRORS, FilePublisher
from service.sources.folders.read import ReadConfig, prepare
from service.sources.folders.recovery import recover
from service.sources.folders.refuse import FailedFolder
from service.sources.folders.results import RETRY_S, ResultCollector
from service.sources.folders.retry import done_event_delay_s
from service.sources.folders.watch import InboxWatcher
from service.sources.folders.work import Work, WorkQueue
from service.state.folder_files import ACCEPTED, PREPARED, READING, FileMeta, FileState, write_results
from service.state.safe_paths import STATE_DIR_MODE, UnsafePathError, display, fit_name, temporary

log = logging.getLogger("enrichd.folders")
WORKERS = 2  # files read and published at the same time


class FolderSource:
    """Watches ``folders.inbox``; ``await start()``, ``await stop()``, ``progress()``."""

    def __init__(
        self,
        settings: Settings,
        subjects: Subjects,
        nc: Client,
        redact: Redactor,
        *,
        supervise: Callable[[Coroutine[Any, Any, None], str], None] | None = None,
    ) -> None:
        """``supervise`` runs the long-lived loops (results, watcher, workers) under the
        daemon's supervision (a loop that dies stops the daemon); without it they are
        this source's own tasks. Short timers (retries, settling) are always its own."""
        self._supervise = supervise
        self.cfg = settings.folders
        # A file's items are read with its handler's spec; a pipeline's (CONTRACT §14)
        # with its first step's, whose prompt needs no earlier step.
        self.registry = {
            **settings.registry,
            **{name: settings.registry[p.steps[0].handler] for name, p in settings.pipeline_specs.items()},
        }
        self.subjects = subjects
        self.inbox = self.cfg.inbox.resolve()
        self.outbox = self.cfg.outbox.resolve()
        self.root = settings.state_dir.resolve() / "folders"
        self.processing = self.inbox / ".processing"
        self._max_item_bytes = min(settings.limits.max_item_bytes, nc.max_payload - 1024)
        self._tokens_param = settings.openai.max_tokens_param
        js = nc.jetstream(publish_async_max_pending=4 * CHUNK)
        self._watcher = InboxWatcher(self.inbox, self.outbox, self.cfg.settle_s, self._ready)
        self._failed = FailedFolder(self.inbox, self._watcher.hold)
        # One consumer per installation: every daemon must see every result of its own files.
        durable = f"{settings.nats.consumer}_folders_{settings.instance}"
        self._results = ResultCollector(js, subjects, durable, self._check_done)
        self._publisher = FilePublisher(js, subjects, redact, nc.max_payload, self._results.expect)
        self._work = WorkQueue()
        self._jobs: dict[str, Job] = {}
        self._stop = asyncio.Event()

    async def start(self) -> None:
        """Resume unfinished files, bind the results consumer, start watching."""
        for folder in (self.inbox, self.outbox):
            folder.mkdir(parents=True, exist_ok=True)
        for folder in (self.root, self.processing):
            folder.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        resume = await self._recover()
        await self._results.bind(min((job.meta.received_at for job in self._jobs.values()), default=None))
        run = self._supervise or (lambda coro, _name: self._work.spawn(coro))
        run(self._results.run(), "folder-results")
        for n in range(WORKERS):
            run(self._work.worker(), f"folder-worker-{n}")
        for work in resume:
            self._work.put(work)
        run(self._watcher.run(self._stop), "folder-watch")
        log.info("watching folder", extra={"inbox": str(self.inbox), "outbox": str(self.outbox)})

    async def stop(self) -> None:
        """Stop watching and working (idempotent); unfinished files resume at the next start."""
        self._stop.set()
        await self._work.stop()
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

    # -- claiming and reading ----------------------------------------------------------------

    def _ready(self, path: Path) -> None:
        self._work.put(partial(self._take, path))

    async def _take(self, path: Path, failures: int = 0) -> None:
        self._watcher.taken(path)
        rel = path.relative_to(self.inbox)
        try:
            handler, victim, refusal = claim.check(
                self.inbox,
                path,
                handlers=self.registry,
                default_handler=self.cfg.default_handler,
                max_file_bytes=self.cfg.max_file_bytes,
            )
        except FileNotFoundError:
            return
        if refusal is not None:
            self._failed.put(victim, victim.relative_to(self.inbox), handler, refusal.code, str(refusal))
            return
        key = f"{time.time_ns():x}-{secrets.token_hex(3)}"
        meta = FileMeta(key, str(rel), handler, str(self.processing / key / path.name), iso(_now()), READING)
        job = Job(meta, FileState(self.root, key), failures=failures)
        try:
            await asyncio.to_thread(claim.claim, job, path)
        except FileNotFoundError:  # gone (or taken by another daemon) meanwhile
            await asyncio.to_thread(claim.discard, job, self.processing)
            return
        except OSError as exc:  # e.g. the state disk is full: the file stays in the inbox
            await asyncio.to_thread(claim.discard, job, self.processing)
            self._watcher.hold(path)  # no rescan meanwhile: this retry is the one
            if not self._work.retry(
                job, exc, partial(self._retake, path, job.failures + 1), "claiming a file"
            ):
                self._watcher.release(path)
                self._failed.put(path, rel, handler, "io_error", f"cannot claim the file: {exc}")
            return
        failpoints.hit("folder_claimed")
        await self._read(job)

    async def _retake(self, path: Path, failures: int) -> None:
        self._watcher.release(path)
        await self._take(path, failures)

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
            await asyncio.to_thread(prepare, job.state, meta, cfg, self.cfg.max_file_bytes)
        except Exception as exc:  # noqa: BLE001 - whatever it is, this file fails, not the daemon
            reraise_if_cancelled()
            if temporary(exc):  # a full disk, an I/O error: not the file's fault, read it later
                if self._work.retry(job, exc, partial(self._read, job), "reading a file"):
                    return
                code = "io_error"
            else:
                code = exc.code if isinstance(exc, FileFormatError) else "unreadable"
            if not isinstance(exc, FileFormatError | OSError):
                log.exception("reading a file failed", extra={"file": display(meta.rel)})
            self._failed.put(Path(meta.source), Path(meta.rel), meta.handler, code, str(exc))
            await asyncio.to_thread(claim.discard, job, self.processing)
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

    # -- publishing --------------------------------------------------------------------------

    async def _publish(self, job: Job) -> None:
        """Publish every item not answered yet; ``accepted`` once intake acked them all.
        Safe to repeat: the message ids are the same, so intake drops what it has."""
        meta = job.meta
        try:
            await self._publisher.items(job)
            await self._publisher.dlq(job)
        except Exception as exc:  # noqa: BLE001 - NATS trouble: try again later
            reraise_if_cancelled()
            self._results.forget(job)
            work = partial(self._publish, job)
            if isinstance(exc, CONNECTION_ERRORS):
                log.warning(
                    "publishing failed; will retry", extra={"file": display(meta.rel), "error": str(exc)}
                )
                self._work.later(RETRY_S, work)
            elif not self._work.retry(job, exc, work, "publishing a file's items"):
                await self._abandon(job, "publish_failed", f"its items could not be published: {exc}")
            return
        job.failures = 0
        meta.state = ACCEPTED
        await asyncio.to_thread(job.state.save, meta)
        failpoints.hit("folder_accepted")
        log.info("file accepted", extra={"file": display(meta.rel), "waiting": len(job.remaining)})
        self._check_done(job)

    # -- finishing ---------------------------------------------------------------------------

    def _check_done(self, job: Job) -> None:
        if job.meta.state == ACCEPTED and not job.remaining and not job.finishing:
            job.finishing = True
            self._work.spawn(self._finish(job))

    async def _finish(self, job: Job) -> None:
        """Source to .done/, results file, file.done event, state removed: each step is
        repeated harmlessly if a crash interrupts the sequence. A results file that cannot
        be written (bounded retries; at once for a symbolic link in the outbox) sends the
        file to .failed/ with its results beside it."""
        meta = job.meta
        root, parts, name = claim.results_place(self.outbox, meta)
        target = root.joinpath(*parts, name)
        if not job.written:
            try:
                await asyncio.to_thread(
                    claim.retire, job, self.inbox
                )  # first: a results file means all is done
                counts = await asyncio.to_thread(write_results, job.state, root, parts, name)
            except Exception as exc:  # noqa: BLE001 - e.g. outbox not writable: keep the state, try again
                reraise_if_cancelled()
                job.finishing = False
                if isinstance(exc, UnsafePathError):
                    await self._abandon(job, "unsafe_outbox", str(exc))
                elif not self._work.retry(job, exc, partial(_call, self._check_done, job), "writing results"):
                    await self._abandon(
                        job, "results_unwritable", f"cannot write {display(str(target))}: {exc}"
                    )
                return
            job.written, job.failures, job.counts = True, 0, counts
        try:
            await self._publisher.done(job, target, _now())
        except Exception as exc:  # noqa: BLE001 - the results are written: only the event is late
            reraise_if_cancelled()
            job.failures += 1
            delay_s = done_event_delay_s(job.failures)
            if delay_s is not None:
                log.warning("publishing file.done failed; will retry", extra={"file": display(meta.rel)})
                job.finishing = False
                self._work.later(delay_s, partial(_call, self._check_done, job))
                return
            log.error(
                "file.done could not be published; the results file is written",
                extra={"file": display(meta.rel), "error": str(exc)},
            )
        await asyncio.to_thread(job.state.remove)
        self._jobs.pop(meta.key, None)
        log.info("file done", extra={"file": display(meta.rel), "handler": meta.handler, **job.counts})

    async def _abandon(self, job: Job, code: str, message: str) -> None:
        """Give a claimed file up: the source (from .processing/ or .done/) to .failed/
        with the reason, the results received so far beside it when they can be written
        there, the state removed."""
        meta = job.meta
        complete = meta.state == ACCEPTED and not job.remaining
        self._results.forget(job)
        source = Path(meta.moved_to) if meta.moved_to else Path(meta.source)
        target = self._failed.put(source, Path(meta.rel), meta.handler, code, message)
        if target is not None and complete:
            name = fit_name(target.name, ".results.jsonl")
            try:
                await asyncio.to_thread(write_results, job.state, target.parent, (), name)
            except Exception as exc:  # noqa: BLE001 - the reason is written; the results are lost
                reraise_if_cancelled()
                log.error("cannot save the results beside the failed file", extra={"error": str(exc)})
        await asyncio.to_thread(claim.discard, job, self.processing)
        self._jobs.pop(meta.key, None)

    # -- recovery ----------------------------------------------------------------------------

    async def _recover(self) -> list[Work]:
        """Rebuild what was in flight at the last stop or crash; returns work to resume."""
        resume: list[Work] = []
        found, jobs = await asyncio.to_thread(recover, self.root, self.processing, self._failed)
        for job, waiting in jobs:
            if job.meta.state == READING:
                resume.append(partial(self._read, job))
                continue
            self._jobs[job.meta.key] = job
            if job.meta.state == PREPARED:
                resume.append(partial(self._publish, job))
                continue
            for item_id in waiting:
                self._results.expect(job, item_id)
            self._check_done(job)
        if found:
            log.info("resuming files", extra={"files": found, "waiting": len(self._jobs)})
        return resume


def _now() -> datetime:
    return datetime.now(UTC)


async def _call(fn: Callable[[Job], None], job: Job) -> None:
    fn(job)
