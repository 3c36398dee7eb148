"""Who advances a batch record: its owner, while the owner's lease runs. A replica saves
a record under its own name with a fresh lease (compare-and-set: one replica wins an
adoption), renews the lease while a batch waits or a long step runs, and adopts a record
whose owner's lease ran out. The clock is passed in."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Literal

from service.aio import reraise_if_cancelled
from service.state.batches import BatchRecord, BatchStore, StaleRecordError

log = logging.getLogger("enrichd.batch")

LeaseStep = Literal["adopt", "renew"] | None


def may_advance(record: BatchRecord, *, instance_id: str, now: float) -> bool:
    """This replica may work on the record: it owns it, or its owner's lease ran out."""
    return record.owner == instance_id or record.lease_until <= now


def lease_step(record: BatchRecord, *, instance_id: str, now: float, lease_s: float) -> LeaseStep:
    """Before a step: adopt another replica's record, renew our lease once half of it
    is gone (a batch that waits hours keeps its owner), or nothing."""
    if record.owner != instance_id:
        return "adopt"
    if record.lease_until - now < lease_s / 2:
        return "renew"
    return None


@dataclass
class LeaseKeeper:
    lost: bool = False  # another replica took the record over


class Leases:
    def __init__(
        self,
        store: BatchStore,
        *,
        instance_id: str,
        lease_s: float,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.store = store
        self.instance_id = instance_id
        self.lease_s = lease_s
        self.clock = clock

    async def save(self, record: BatchRecord) -> BatchRecord:
        """Save the record as ours with a fresh lease (StaleRecordError: someone else
        changed it since it was read)."""
        record.owner = self.instance_id
        record.lease_until = self.clock() + self.lease_s
        return await self.store.update(record)

    async def claim(self, record: BatchRecord) -> BatchRecord:
        """Adopt or renew as :func:`lease_step` says, before a step on the record."""
        step = lease_step(record, instance_id=self.instance_id, now=self.clock(), lease_s=self.lease_s)
        if step is None:
            return record
        record = await self.save(record)
        if step == "adopt":
            log.info("adopted batch", extra={"flush_id": record.flush_id, "batch_id": record.batch_id})
        return record

    @contextlib.asynccontextmanager
    async def kept(self, record: BatchRecord) -> AsyncIterator[LeaseKeeper]:
        """Renew the record's lease every third of it while a long step runs (an upload
        of a large batch file can outlast it): a replica at work must not look dead to
        the others, or one would adopt the flush and submit it a second time."""
        keeper = LeaseKeeper()
        stop = asyncio.Event()

        async def renew() -> None:
            while not keeper.lost:
                try:
                    await asyncio.wait_for(stop.wait(), self.lease_s / 3)
                    return
                except TimeoutError:
                    pass
                try:
                    await self.save(record)
                except StaleRecordError:
                    keeper.lost = True
                except Exception:  # noqa: BLE001 - NATS trouble: try again next time
                    reraise_if_cancelled()
                    log.debug("lease renewal failed", exc_info=True)

        task = asyncio.create_task(renew(), name=f"lease-{record.flush_id}")
        try:
            yield keeper
        finally:
            stop.set()
            await asyncio.gather(task, return_exceptions=True)
