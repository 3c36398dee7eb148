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
    # a whole minute of burst and no headroom, so the sharing shows in round numbers
    limits = {"gpt-4o-mini": Limits(rpm=10, tpm=None, urgent_reserve=0.2, burst_s=60, headroom=0.0)}
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
    import time

    from service.emulator import FaultConfig
    from tests.conftest import events, read_stream

    emulator.set_faults(FaultConfig(rpm=240))
    daemon = await make_daemon(rate_limits={"gpt-4o-mini": {"rpm": 240}})
    js = nc.jetstream()
    started = time.monotonic()
    for i in range(18):
        await js.publish(
            f"{prefix}.in.tags",
            json.dumps({"id": f"l{i}", "text": f"limited {i}", "priority": "urgent"}).encode(),
        )
    out = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 18, 60.0))
    assert all(e["status"] == "ok" for e in out)
    assert emulator.stats["status_counts"].get(429, 0) == 0
    # paced, not burst: 4 at once (a second of the limit), then 3.84 per second
    assert time.monotonic() - started >= (18 - 4) / 3.84 - 0.5


async def test_queued_callers_poll_the_shared_bucket_one_at_a_time(nc, prefix) -> None:
    """Hundreds of items waiting in one replica must not all poll KV: they queue locally."""
    js = nc.jetstream()
    limits = {"gpt-4o-mini": Limits(rpm=6000, tpm=None)}  # 100 at once, then 96 per second
    replicas = [
        await SharedLimiter.open(js, f"{prefix.upper()}_LIMITS", limits, replicas=1) for _ in range(2)
    ]
    reads = [0, 0]
    for i, limiter in enumerate(replicas):
        kv_get = limiter._kv.get  # noqa: SLF001 - count the reads, the real KV answers them

        async def counted(key: str, _get=kv_get, _i=i) -> object:  # type: ignore[no-untyped-def]
            reads[_i] += 1
            return await _get(key)

        limiter._kv.get = counted  # type: ignore[method-assign]  # noqa: SLF001
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.gather(*[replicas[i % 2].acquire("gpt-4o-mini", tokens=1, urgent=True) for i in range(300)])
    took = loop.time() - started
    assert took >= (300 - 100) / 96 - 0.2  # the shared limit held
    assert took < 6.0
    # ~one read per grant plus one per refill interval and poller; unqueued it was thousands
    assert sum(reads) < 900, reads
