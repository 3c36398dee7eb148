"""This replica's hold on one digest window: every change to the digest's record is a
compare-and-set on the revision it last wrote, so a replica that lost the window (its
lease ran out and another took it) finds out at its next write and stops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import replace
from datetime import datetime

from service.state.digests import DigestBook, DigestRecord, Lease

log = logging.getLogger("enrichd.digests")


class LeaseLostError(Exception):
    """Another replica changed the digest's record: this one no longer runs the window."""

    def __init__(self, digest: str) -> None:
        super().__init__(f"digest {digest}: the window was taken over by another replica")
        self.digest = digest


class WindowLease:
    def __init__(
        self,
        book: DigestBook,
        digest: str,
        record: DigestRecord,
        revision: int,
        *,
        lease_s: float,
        clock: Callable[[], datetime],
    ) -> None:
        assert record.window is not None
        self.digest = digest
        self._book = book
        self._record = record
        self._revision = revision
        self._lease_s = lease_s
        self._clock = clock
        self._lock = asyncio.Lock()
        self.lost = False

    @property
    def window(self) -> Lease:
        assert self._record.window is not None
        return self._record.window

    async def _write(self, record: DigestRecord) -> None:
        async with self._lock:
            if self.lost:
                raise LeaseLostError(self.digest)
            revision = await self._book.update(self.digest, record, self._revision)
            if revision is None:
                self.lost = True
                raise LeaseLostError(self.digest)
            self._record, self._revision = record, revision

    def _until(self, seconds: float) -> float:
        return self._clock().timestamp() + seconds

    async def renew(self) -> None:
        if self._record.window is None:  # closed meanwhile: nothing to hold
            return
        await self._write(
            self._record.with_window(replace(self.window, lease_until=self._until(self._lease_s)))
        )

    async def mark_done(self, token: str) -> None:
        window = self.window
        await self._write(self._record.with_window(replace(window, done=(*window.done, token))))

    async def failed(self, token: str, *, retry_in_s: float) -> int:
        """Count a failed run of ``token``'s group and hold the window (ours) until the
        retry; returns the runs failed so far."""
        window = self.window
        attempts = {**window.attempts, token: window.attempts.get(token, 0) + 1}
        held = replace(window, attempts=attempts, lease_until=self._until(retry_in_s))
        await self._write(self._record.with_window(held))
        return attempts[token]

    async def hold(self, seconds: float) -> None:
        """Keep the window ours but idle for ``seconds`` (today's budget is spent)."""
        await self._write(self._record.with_window(replace(self.window, lease_until=self._until(seconds))))

    async def close(self) -> None:
        """The window is done: the cursor moves to its end and the lease goes, in one step."""
        await self._write(DigestRecord(cursor=self.window.end, window=None))

    async def heartbeat(self) -> None:
        """Renew every third of the lease while the window runs (cancelled when it ends)."""
        while True:
            await asyncio.sleep(self._lease_s / 3)
            try:
                await self.renew()
            except LeaseLostError:
                log.warning("digest window lost to another replica", extra={"digest": self.digest})
                return
            except Exception:  # noqa: BLE001 - NATS hiccup: the next renewal may succeed
                log.warning("renewing a digest lease failed", extra={"digest": self.digest}, exc_info=True)
