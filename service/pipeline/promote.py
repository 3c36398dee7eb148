"""Promotion (CONTRACT §11): an item waiting for a batch, in a buffer or inside a
provider batch, whose deadline comes within ``routing.promote_margin_s`` is answered on
the cheapest route that can still meet it (flex where allowed, else sync).

Exactly one result event per intake message: the promoted ending is written like any
sync ending (event ``<id>:<handler>`` with the intake-seq header, store or DLQ), then the
intake message is marked (state/promoted.py). The batch path takes a marked item out of
its buffer and never publishes its batch answer; while a promotion runs here, this
replica's flush leaves the item in its buffer. A crash before the mark leaves the item
to the batch path: answered, late perhaps, never lost (a second answer within the
result stream's duplicate window is dropped by its message id).

Where the promotion is scheduled: when this replica buffers an item with a deadline
(at deadline − margin), when a flush fetches one already due (after a restart the
schedule is gone, the buffer is not), and when the poll loop finds due items in a
batch in flight (the record's ``promote_at``)."""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Awaitable, Callable, Iterable, Mapping
from datetime import datetime, timedelta
from typing import Any

from service.aio import reraise_if_cancelled
from service.core import fastjson
from service.core.chain import ChainState
from service.core.errors import EnrichError
from service.core.events import iso
from service.core.intake import Intake
from service.core.items import item_from_object, parse_deadline
from service.core.routing import FlexRoute, RoutingRules, deadline_route, promote_due
from service.pipeline.config import PipelineConfig
from service.pipeline.finish import Finish
from service.pipeline.packer import Packer
from service.pipeline.ports import Store
from service.state.budget import BudgetExhaustedError
from service.state.promoted import PromotedMarks, promotion_key

log = logging.getLogger("enrichd.promote")


def record_key(record: dict[str, Any]) -> str:
    return promotion_key(record["handler"], record["item"]["id"], record.get("intake_seq"))


def record_deadline(record: dict[str, Any]) -> datetime | None:
    value = record.get("item", {}).get("deadline")
    if not value:
        return None
    try:
        return parse_deadline(value)
    except Exception:  # noqa: BLE001 - a record that was accepted has a good deadline
        return None


class Promoter:
    def __init__(
        self,
        *,
        answer: Callable[[dict[str, Any]], Awaitable[bool]],
        marks: PromotedMarks,
        rules: RoutingRules,
        clock: Callable[[], datetime],
        concurrency: int = 16,
    ) -> None:
        self._answer = answer
        self._marks = marks
        self._rules = rules
        self._clock = clock
        self._slots = asyncio.Semaphore(concurrency)
        self._heap: list[tuple[datetime, int, str, bytes | dict[str, Any]]] = []
        self._counter = itertools.count()
        self._scheduled: set[str] = set()
        self._running: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._wake = asyncio.Event()
        self.promoted = 0

    # -- what the batch path asks ----------------------------------------------------

    def due(self, record: dict[str, Any]) -> bool:
        return promote_due(record_deadline(record), now=self._clock(), rules=self._rules)

    def busy(self, record: dict[str, Any]) -> bool:
        """Being promoted in this replica now: its flush leaves it in the buffer."""
        return record_key(record) in self._running

    def promote_at(self, records: Iterable[dict[str, Any]]) -> float | None:
        """When the first of these items is due (epoch seconds), None for no deadline."""
        deadlines = [d for d in (record_deadline(r) for r in records) if d is not None]
        if not deadlines:
            return None
        return (min(deadlines) - timedelta(seconds=self._rules.promote_margin_s)).timestamp()

    async def taken(self) -> set[str]:
        return await self._marks.taken()

    def mark_message(self, record: dict[str, Any]) -> tuple[str, bytes]:
        return self._marks.mark_message(record_key(record))

    def wanted(self, record: dict[str, Any] | bytes, *, due: datetime | None = None) -> None:
        """Promote this buffer record at ``due`` (now when None)."""
        decoded = fastjson.loads(record) if isinstance(record, bytes) else record
        key = record_key(decoded)
        if key in self._scheduled or key in self._running:
            return
        self._scheduled.add(key)
        heapq.heappush(self._heap, (due or self._clock(), next(self._counter), key, record))
        self._wake.set()

    def buffered(self, payload: bytes, deadline: datetime) -> None:
        """This replica buffered an item with a deadline: promote it when it is due."""
        self.wanted(payload, due=deadline - timedelta(seconds=self._rules.promote_margin_s))

    # -- the loop (a task owned by the daemon) -------------------------------------------

    async def loop(self) -> None:
        while True:
            reraise_if_cancelled()
            now = self._clock()
            while self._heap and self._heap[0][0] <= now:
                _, _, key, record = heapq.heappop(self._heap)
                self._scheduled.discard(key)
                self._running.add(key)
                task = asyncio.create_task(self._one(key, record), name="promote-item")
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)
            wait = 1.0
            if self._heap:
                wait = max(0.05, min(wait, (self._heap[0][0] - now).total_seconds()))
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), timeout=wait)
            except TimeoutError:
                pass

    async def _one(self, key: str, record: bytes | dict[str, Any]) -> None:
        try:
            async with self._slots:
                decoded = fastjson.loads(record) if isinstance(record, bytes) else record
                if await self._marks.has(key):  # answered by promotion already, or ended
                    return
                if await self._answer(decoded):  # False: not answered, the batch path keeps it
                    await self._marks.mark(key)
                    self.promoted += 1
        except asyncio.CancelledError:
            raise
        except Exception:
            reraise_if_cancelled()
            # Left to the batch path, which answers it (late perhaps): never lost.
            log.exception("promotion failed; the item stays on the batch path", extra={"key": key})
        finally:
            self._running.discard(key)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


class PromotedAnswer:
    """The promoter's ``answer``: one buffered (or batched) item answered now, on the
    cheapest route that can still meet its deadline, as its intake message's ending.
    False when it was not answered here (its handler is gone, its request cannot be
    built, or the budget is spent): the batch path keeps it."""

    def __init__(
        self,
        *,
        config: PipelineConfig,
        store: Store,
        clock: Callable[[], datetime],
        flex: Mapping[str, bool],
        packer: Packer,
        finish: Finish,
    ) -> None:
        self._config = config
        self._store = store
        self._clock = clock
        self._flex = flex
        self._packer = packer
        self._finish = finish

    async def __call__(self, record: dict[str, Any]) -> bool:
        handler = record["handler"]
        spec = self._config.registry.get(handler)
        if spec is None:
            return False
        chain = None
        try:
            item = item_from_object(record["item"], handler)
            if record.get("chain"):  # a pipeline step (CONTRACT §14)
                chain = ChainState.from_dict(record["chain"], record["item"])
                if chain.pipeline not in self._config.pipelines:
                    return False
            steps = chain.results if chain is not None else None
            body = spec.build_body(item, max_tokens_param=self._config.max_tokens_param, steps=steps)
        except EnrichError:
            return False  # the flush ends it with that error
        seq = record.get("intake_seq")
        stored = await self._store.get(handler, item.id, spec.version)
        if stored is not None and stored.intake_seq == seq and seq is not None:
            return True  # this very message is answered (a promotion before a crash)
        assert item.deadline is not None
        decision = deadline_route(
            item.deadline, now=self._clock(), rules=self._config.rules, flex=self._flex.get(handler, False)
        )
        tier = "flex" if isinstance(decision, FlexRoute) else "sync"
        intake = Intake(
            raw=b"",
            handler=handler,
            subject=self._config.intake_prefix + handler,
            received_at=datetime.fromisoformat(record["received_at"].replace("Z", "+00:00")),
            seq=seq,
        )
        try:
            # promoted together (a buffer's worth of deadlines), a packing handler's items share requests
            outcome = await self._packer.run(
                spec, item, body, received_at=intake.received_at, route=tier, steps=steps
            )
        except BudgetExhaustedError:
            return False
        await self._finish.finish(outcome, item=item, intake=intake, chain=chain)
        log.info(
            "promoted",
            extra={
                "item_id": item.id,
                "handler": handler,
                "route": outcome.route,
                "deadline": iso(item.deadline),
            },
        )
        return True
