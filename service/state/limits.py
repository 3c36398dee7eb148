"""Rate limits shared by every replica: one token bucket per model in JetStream KV,
updated with compare-and-set (service/core/ratelimit.py has the arithmetic).

Within one replica, callers waiting for the same model queue on a local lock (one for
urgent, one for other work), so only one of them at a time polls the shared bucket: a
replica holds hundreds of items in flight, and all of them polling KV every refill
interval would cost more than the calls themselves."""

from __future__ import annotations

import asyncio
import json
import logging
import random
import time
from collections.abc import Callable

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from service.core.ratelimit import Bucket, Limits, reserve, settle, tighten
from service.state.streams import open_kv

log = logging.getLogger("enrichd.ratelimit")


def _key(model: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in model)


class SharedLimiter:
    def __init__(
        self, kv: KeyValue, limits: dict[str, Limits], *, clock: Callable[[], float] = time.time
    ) -> None:
        self._kv = kv
        self._limits = dict(limits)
        self._clock = clock
        self._rng = random.Random()
        self._queues: dict[tuple[str, bool], asyncio.Lock] = {}

    @classmethod
    async def open(
        cls, js: JetStreamContext, bucket: str, limits: dict[str, Limits], *, replicas: int
    ) -> SharedLimiter:
        kv = await open_kv(js, bucket, replicas=replicas)
        return cls(kv, limits)

    async def _read(self, model: str, limits: Limits) -> tuple[Bucket, int]:
        try:
            entry = await self._kv.get(_key(model))
        except KeyNotFoundError:
            return Bucket.full(limits, self._clock()), 0
        data = json.loads(entry.value or b"{}")
        return Bucket(float(data["r"]), float(data["t"]), float(data["at"])), entry.revision or 0

    async def _write(self, model: str, bucket: Bucket, revision: int) -> bool:
        value = json.dumps({"r": bucket.requests, "t": bucket.tokens, "at": bucket.at}).encode()
        try:
            if revision:
                await self._kv.update(_key(model), value, last=revision)
            else:
                await self._kv.create(_key(model), value)
        except KeyWrongLastSequenceError:
            return False
        return True

    async def acquire(self, model: str, *, tokens: int, urgent: bool) -> float:
        """Wait until the model's shared bucket grants one request of ``tokens``; returns
        the seconds waited (queueing included). Models without configured limits pass at once."""
        if model not in self._limits:
            return 0.0
        loop = asyncio.get_running_loop()
        started = loop.time()
        queue = self._queues.setdefault((model, urgent), asyncio.Lock())
        waited = queue.locked()
        async with queue:
            while True:
                wait = await self.try_acquire(model, tokens=tokens, urgent=urgent)
                if wait == 0:
                    return loop.time() - started if waited else 0.0
                waited = True
                # a little jitter so the replicas' pollers do not collide on every refill
                await asyncio.sleep(min(wait, 5.0) + self._rng.uniform(0, 0.02))

    async def try_acquire(self, model: str, *, tokens: int, urgent: bool) -> float:
        """One attempt: 0.0 when granted, else the seconds to wait before the next."""
        limits = self._limits.get(model)
        if limits is None:
            return 0.0
        while True:
            bucket, revision = await self._read(model, limits)
            taken, wait = reserve(bucket, limits, self._clock(), tokens=tokens, urgent=urgent)
            if wait > 0:
                return wait
            if await self._write(model, taken, revision):
                return 0.0
            # another replica wrote first: read again

    async def settle(self, model: str, *, estimated: int, actual: int) -> None:
        limits = self._limits.get(model)
        if limits is None or estimated == actual:
            return
        for _ in range(10):
            bucket, revision = await self._read(model, limits)
            if await self._write(
                model, settle(bucket, limits, self._clock(), estimated=estimated, actual=actual), revision
            ):
                return

    def observe(self, model: str, headers: dict[str, str]) -> None:
        """Follow the provider's own view of our limits when it is stricter."""
        limits = self._limits.get(model)
        if limits is None:
            return

        def number(name: str) -> float | None:
            try:
                return float(headers[name])
            except (KeyError, ValueError):
                return None

        tighter = tighten(
            limits,
            provider_rpm=number("x-ratelimit-limit-requests"),
            provider_tpm=number("x-ratelimit-limit-tokens"),
        )
        if tighter != limits:
            log.info(
                "provider limits are lower than configured; following them",
                extra={"model": model, "rpm": tighter.rpm, "tpm": tighter.tpm},
            )
            self._limits[model] = tighter
