"""Two replicas' limiters draw from one bucket in JetStream KV (compare-and-set)."""

from __future__ import annotations

import asyncio

from service.core.ratelimit import Limits
from service.state.limits import SharedLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1_000.0

    def __call__(self) -> float:
        return self.now


async def test_two_replicas_share_one_bucket(nc, prefix) -> None:
    js = nc.jetstream()
    clock = Clock()
    limits = {"gpt-4o-mini": Limits(rpm=10, tpm=None, urgent_reserve=0.2)}
    a = await SharedLimiter.open(js, f"{prefix.upper()}_LIMITS", limits, replicas=1)
    b = await SharedLimiter.open(js, f"{prefix.upper()}_LIMITS", limits, replicas=1)
    a._clock = b._clock = clock  # noqa: SLF001 - the test drives time
    granted = await asyncio.gather(
        *[(a if i % 2 else b).try_acquire("gpt-4o-mini", tokens=1, urgent=False) for i in range(12)]
    )
    assert granted.count(0.0) == 8  # 10 per minute, 2 kept for urgent work
    assert await a.try_acquire("gpt-4o-mini", tokens=1, urgent=False) > 0
    assert await b.try_acquire("gpt-4o-mini", tokens=1, urgent=True) == 0.0
    assert await a.try_acquire("gpt-4o-mini", tokens=1, urgent=True) == 0.0
    wait = await b.try_acquire("gpt-4o-mini", tokens=1, urgent=True)
    assert wait == 6.0  # one request refills every 6 s
    clock.now += wait
    assert await a.try_acquire("gpt-4o-mini", tokens=1, urgent=True) == 0.0
    assert await a.try_acquire("unlimited-model", tokens=10**6, urgent=False) == 0.0


async def test_daemon_with_limits_gets_no_429(make_daemon, nc, prefix, emulator) -> None:
    import json

    from service.emulator import FaultConfig
    from tests.conftest import events, read_stream

    emulator.set_faults(FaultConfig(rpm=20))
    daemon = await make_daemon(rate_limits={"gpt-4o-mini": {"rpm": 20}})
    js = nc.jetstream()
    for i in range(18):
        await js.publish(
            f"{prefix}.in.tags",
            json.dumps({"id": f"l{i}", "text": f"limited {i}", "priority": "urgent"}).encode(),
        )
    out = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 18))
    assert all(e["status"] == "ok" for e in out)
    assert emulator.stats["status_counts"].get(429, 0) == 0
