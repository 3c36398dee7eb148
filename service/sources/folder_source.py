"""Watched folders (CONTRACT §7): files dropped into ``folders.inbox`` become items on
``enrich.in.<handler>`` (same routing, batching and durability as NATS items), and their
results come back as ``outbox/<handler>/<name>.results.jsonl``.

The life of one file (docs/folders.md has the crash analysis):
1. *settle* (:class:`InboxWatcher`): watchfiles or a scan reports it; it is taken once
   unchanged for ``folders.settle_s`` (a file that is already older is taken at once).
2. *claim*: refused (→ ``inbox/.failed/``) if any part of its path is a symlink, it is not
   a regular file, too large, empty, or its subfolder is no handler; else its state is
   saved and it is renamed into ``inbox/.processing/<key>/``, out of everyone's way.
3. *read* (thread): items validated into a manifest, bad records spooled as error events.
4. *publish*: items to intake with ``Nats-Msg-Id: <key>:<n>``; ``accepted`` once all acked.
5. *collect* (:class:`ResultCollector`): a durable pull consumer on ``<prefix>.out.>``
   spools each awaited result (fsync, then ack).
6. *finish*: the source to ``inbox/.done/``, the results file in input order (atomic),
   ``enrich.events.file.done``.
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
from datetime import UTC, datetime, timedelta
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from watchfiles import Change, awatch

from service import failpoints
from service.aio import quietly, reraise_if_cancelled
from service.core.events import iso
from service.core.formats import FileFormatError, ignored_name
from service.settings import Settings
from service.sinks.events import Redactor, dumps
from service.state import files
from service.state.files import ACCEPTED, PREPARED, READING, FileMeta, FileState, ReadConfig, display
from service.subjects import Subjects

if TYPE_CHECKING:
    from service.app import Daemon

log = logging.getLogger("enrichd.folders")
WORKERS = 2  # files read and published at the same time
CHUNK = 1000  # items published per PubAck round
FETCH = 500  # result events per pull
RESULTS_ACK_WAIT_S = 10.0
RESCAN_S = 60.0  # safety net for missed notifications (inotify queue overflow, odd mounts)
RETRY_S = 5.0
Work = Callable[[], Awaitable[None]]


@dataclass(eq=False)
class Job:
    """A claimed file: its durable state, and the item ids whose results it still awaits."""

    meta: FileMeta
    state: FileState
    remaining: set[str] = field(default_factory=set)
    finishing: bool = False


class InboxWatcher:
    """Reports files of the inbox once they are complete: watchfiles events, a scan
    whenever the watcher (re)starts and every RESCAN_S, and a settle wait per file."""

    def __init__(self, inbox: Path, outbox: Path, settle_s: float, on_ready: Callable[[Path], None]) -> None:
        self.inbox, self.outbox, self.settle_s = inbox, outbox, settle_s
        self._on_ready = on_ready
        self._settling: dict[Path, asyncio.Task[None]] = {}
        self._reported: set[Path] = set()  # handed over, not yet taken
        self._held: set[Path] = set()  # refused files that could not be moved: left alone

    def taken(self, path: Path) -> None:
        self._reported.discard(path)

    def hold(self, path: Path) -> None:
        self._held.add(path)

    async def run(self, stop: asyncio.Event) -> None:
        # The Rust watcher dies on some events (e.g. a path that is not UTF-8): start it
        # again; the scan after each start picks up whatever happened in between.
        delay = 0.2
        try:
            while not stop.is_set():
                started = time.monotonic()
                try:
                    self.inbox.mkdir(parents=True, exist_ok=True)  # it may have been deleted
                    await self._watch(stop)
                except Exception as exc:  # noqa: BLE001 - watching must go on
                    reraise_if_cancelled()
                    log.warning("folder watcher failed; restarting it", extra={"error": display(str(exc))})
                    delay = 0.2 if time.monotonic() - started > 10 else min(delay * 2, 5.0)
                    await asyncio.sleep(delay)
        finally:
            settling = list(self._settling.values())
            for task in settling:
                task.cancel()
            await asyncio.gather(*settling, return_exceptions=True)

    async def _watch(self, stop: asyncio.Event) -> None:
        scanned = -RESCAN_S
        watch = awatch(
            self.inbox, watch_filter=self._wanted, stop_event=stop, rust_timeout=500, yield_on_timeout=True
        )
        async for changes in watch:
            if time.monotonic() - scanned >= RESCAN_S:  # the first pass: the watcher is running now
                scanned = time.monotonic()
                self._scan(self.inbox)
            for change, raw in changes:
                if change == Change.deleted:
                    self._forget(Path(raw))
                else:
                    self._consider(Path(raw))

    def _wanted(self, _change: Change, raw: str) -> bool:
        try:
            rel = Path(raw).relative_to(self.inbox)
        except ValueError:
            return False
        return not any(ignored_name(part) for part in rel.parts) and not self._in_outbox(Path(raw))

    def _in_outbox(self, path: Path) -> bool:
        return path == self.outbox or self.outbox in path.parents  # an outbox inside the inbox

    def _scan(self, folder: Path) -> None:
        try:
            entries = list(os.scandir(folder))
        except OSError:
            return
        for entry in entries:
            path = Path(entry.path)
            if ignored_name(entry.name) or self._in_outbox(path):
                continue
            if entry.is_dir(follow_symlinks=False):
                self._scan(path)
            else:
                self._consider(path)

    def _consider(self, path: Path) -> None:
        if path in self._settling or path in self._reported or path in self._held:
            return
        try:
            mode = os.lstat(path).st_mode
        except OSError:
            return
        if stat.S_ISDIR(mode):  # a folder moved in arrives as one event: look inside
            self._scan(path)
            return
        task = asyncio.create_task(self._settle(path))
        self._settling[path] = task
        task.add_done_callback(lambda _: self._settling.pop(path, None))

    def _forget(self, path: Path) -> None:
        self._held.discard(path)
        task = self._settling.pop(path, None)
        if task is not None:
            task.cancel()

    async def _settle(self, path: Path) -> None:
        """Wait until unchanged (size, mtime) for settle_s, by the clock or by its mtime
        (a file written elsewhere and renamed in is taken at once)."""
        last: tuple[int, int] | None = None
        since = time.monotonic()
        while True:
            try:
                st = os.lstat(path)
            except OSError:  # gone; or unreadable, and the next scan tries again
                return
            if not stat.S_ISREG(st.st_mode):
                break  # refused at once; nothing to wait for
            if (st.st_size, st.st_mtime_ns) != last:
                last, since = (st.st_size, st.st_mtime_ns), time.monotonic()
            quiet_for = max(time.time() - st.st_mtime, time.monotonic() - since)
            if quiet_for >= self.settle_s:
                break
            await asyncio.sleep(min(0.5, max(0.05, self.settle_s - quiet_for)))
        self._reported.add(path)
        self._on_ready(path)


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


def _spool(batch: dict[Job, list[tuple[str, bytes]]]) -> None:
    for job, lines in batch.items():
        job.state.append(lines)


async def _acked(futures: list[asyncio.Future[Any]]) -> None:
    if not futures:
        return
    results = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), 30)
    failed = [r for r in results if isinstance(r, BaseException)]
    if failed:
        raise RuntimeError(f"{len(failed)} of {len(futures)} publishes were not acknowledged: {failed[0]!r}")


def _event_id(data: bytes) -> str | None:
    try:
        value = json.loads(data).get("id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None


def _now() -> datetime:
    return datetime.now(UTC)


async def _call(fn: Callable[[Job], None], job: Job) -> None:
    fn(job)
