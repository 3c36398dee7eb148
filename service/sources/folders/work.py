"""The work of the folder source: steps of files on a queue, run by a few workers, and
timers that put a failed step back on it later (bounded: :mod:`.retry`). Every task the
folder source starts is spawned here, so ``stop()`` ends them all."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from service.aio import reraise_if_cancelled
from service.sources.folders.job import Job
from service.sources.folders.retry import step_delay_s
from service.state.safe_paths import display, temporary

log = logging.getLogger("enrichd.folders")
Work = Callable[[], Awaitable[None]]


class WorkQueue:
    """``put`` a step, ``later`` a step, ``retry`` a failed one; ``worker()`` runs them;
    ``stop()`` cancels what was spawned here."""

    def __init__(self) -> None:
        self._queue: asyncio.Queue[Work] = asyncio.Queue()
        self._tasks: set[asyncio.Task[None]] = set()

    async def stop(self) -> None:
        """Cancel every task spawned here and wait for them (idempotent)."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def put(self, work: Work) -> None:
        self._queue.put_nowait(work)

    def spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def later(self, delay_s: float, work: Work) -> None:
        async def wait() -> None:
            await asyncio.sleep(delay_s)
            self._queue.put_nowait(work)

        self.spawn(wait())

    def retry(self, job: Job, exc: BaseException, work: Work, step: str) -> bool:
        """Schedule ``work`` again after a backoff; False when the step has failed too
        often (then the caller gives the file up)."""
        job.failures += 1
        extra = {"file": display(job.meta.rel), "error": display(str(exc)), "attempt": job.failures}
        delay = step_delay_s(job.failures, temporary=temporary(exc))
        if delay is None:
            log.error(f"{step} failed {job.failures} times; giving the file up", extra=extra)
            return False
        log.warning(f"{step} failed; will retry", extra=extra | {"retry_in_s": delay})
        self.later(delay, work)
        return True

    async def worker(self) -> None:
        """Run steps from the queue, one at a time, until cancelled."""
        while True:
            reraise_if_cancelled()
            work = await self._queue.get()
            try:
                await work()
            except Exception:  # noqa: BLE001 - one file must never stop the daemon
                reraise_if_cancelled()
                log.exception("folder work failed")
