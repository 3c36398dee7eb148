"""The inbox watcher of the folder source (step 1, *settle*, of the life of a file in
:mod:`service.sources.folders`): :class:`InboxWatcher` reports each file of
``folders.inbox`` once it is complete — found by watchfiles events or a scan, and taken
once unchanged for ``folders.settle_s`` (a file that is already older is taken at once)."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import time
from collections.abc import Callable
from pathlib import Path

from watchfiles import Change, awatch

from service.aio import reraise_if_cancelled
from service.core.formats import ignored_name
from service.state.safe_paths import display

log = logging.getLogger("enrichd.folders")
RESCAN_S = 60.0  # safety net for missed notifications (inotify queue overflow, odd mounts)


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

    def release(self, path: Path) -> None:
        self._held.discard(path)

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
