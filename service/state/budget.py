"""The spending ledger shared by every replica: one KV entry per budget day and scope,
updated with compare-and-set."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from datetime import datetime

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from service.core.budget import Caps, budget_day, fits
from service.state.streams import open_kv


class BudgetExhaustedError(Exception):
    """The cost does not fit in today's budget of ``scope``."""

    def __init__(self, scope: str, cap_usd: float, spent_usd: float) -> None:
        super().__init__(f"budget {scope} is spent: {spent_usd:.6f} of {cap_usd:.6f} USD today")
        self.scope = scope
        self.cap_usd = cap_usd
        self.spent_usd = spent_usd


class Ledger:
    def __init__(
        self,
        kv: KeyValue,
        caps: Caps,
        *,
        clock: Callable[[], datetime],
        on_exceeded: Callable[[str, str, float, float], Awaitable[None]] | None = None,
    ) -> None:
        self._kv = kv
        self.caps = caps
        self.clock = clock
        self._on_exceeded = on_exceeded

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        bucket: str,
        caps: Caps,
        *,
        replicas: int,
        clock: Callable[[], datetime],
        on_exceeded: Callable[[str, str, float, float], Awaitable[None]] | None = None,
    ) -> Ledger:
        kv = await open_kv(js, bucket, replicas=replicas, ttl_s=40 * 86_400)
        return cls(kv, caps, clock=clock, on_exceeded=on_exceeded)

    async def _read(self, key: str) -> tuple[dict[str, float], int]:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return {"sync": 0.0, "batch": 0.0}, 0
        return json.loads(entry.value or b"{}"), entry.revision or 0

    async def _add(self, key: str, route: str, usd: float, cap: float | None) -> bool:
        """Add ``usd`` (may be negative) unless it would cross ``cap``; CAS retried."""
        while True:
            spend, revision = await self._read(key)
            total = spend.get("sync", 0.0) + spend.get("batch", 0.0)
            if cap is not None and usd > 0 and not fits(total, usd, cap):
                return False
            spend[route] = spend.get(route, 0.0) + usd
            value = json.dumps(spend).encode()
            try:
                if revision:
                    await self._kv.update(key, value, last=revision)
                else:
                    await self._kv.create(key, value)
                return True
            except KeyWrongLastSequenceError:
                continue

    async def reserve(self, handler: str, route: str, usd: float) -> str:
        """Reserve ``usd`` in every scope that applies; returns the budget day, or raises
        BudgetExhaustedError (after releasing what was reserved in other scopes)."""
        day = budget_day(self.clock())
        done: list[str] = []
        for scope, cap in self.caps.scopes(handler):
            key = f"{day}.{scope}"
            if not await self._add(key, route, usd, cap):
                for other in done:
                    await self._add(other, route, -usd, None)
                spend, _ = await self._read(key)
                spent = spend.get("sync", 0.0) + spend.get("batch", 0.0)
                await self._exceeded(day, scope, cap, spent)
                raise BudgetExhaustedError(scope, cap, spent)
            done.append(key)
        return day

    async def correct(self, day: str, handler: str, route: str, delta_usd: float) -> None:
        """Replace a reservation by the real cost (``delta`` = real - reserved)."""
        if not delta_usd:
            return
        for scope, _ in self.caps.scopes(handler):
            await self._add(f"{day}.{scope}", route, delta_usd, None)

    async def remaining(self, handler: str) -> float | None:
        """USD left today for ``handler`` (the tightest applicable scope); None = no cap."""
        day = budget_day(self.clock())
        left: float | None = None
        for scope, cap in self.caps.scopes(handler):
            spend, _ = await self._read(f"{day}.{scope}")
            room = cap - spend.get("sync", 0.0) - spend.get("batch", 0.0)
            left = room if left is None else min(left, room)
        return left

    async def spent(self, scope: str = "all") -> dict[str, float]:
        return (await self._read(f"{budget_day(self.clock())}.{scope}"))[0]

    async def _exceeded(self, day: str, scope: str, cap: float, spent: float) -> None:
        # One event per day and scope, whichever replica gets there first.
        try:
            await self._kv.create(f"{day}.{scope}.exceeded", b"1")
        except KeyWrongLastSequenceError:
            return
        if self._on_exceeded is not None:
            await self._on_exceeded(day, scope, cap, spent)
