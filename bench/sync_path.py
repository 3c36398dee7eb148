"""Ratio benchmark of the sync path (4). The cost benchmarks are in bench/cost_mix.py."""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from bench.harness import KEY, Check, Env, item_1k, median

SYNC_ITEMS = 800  # per round, at 64 in flight
LATENCY_ITEMS = 100  # per round, one at a time


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def concurrently(call: Callable[[int], Awaitable[None]], indices: Iterable[int], workers: int) -> float:
    """Run ``call`` over ``indices`` with ``workers`` in flight; seconds."""
    queue = iter(indices)

    async def worker() -> None:
        for i in queue:
            await call(i)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(workers)))
    return time.perf_counter() - started


async def one_by_one(call: Callable[[int], Awaitable[None]], indices: Iterable[int]) -> list[float]:
    """Latency of each call, one at a time; milliseconds."""
    out = []
    for i in indices:
        started = time.perf_counter()
        await call(i)
        out.append((time.perf_counter() - started) * 1000)
    return out


# -- 4. the sync path -----------------------------------------------------------------------


async def bench_sync(env: Env, *, rounds: int = 4) -> list[Check]:
    from openai import AsyncOpenAI

    from service.core.intake import Intake

    prefix = "rsync"
    daemon = await env.daemon(prefix, openai={"max_concurrency": 64})
    pipeline = daemon.pipeline
    total = 200 + rounds * (SYNC_ITEMS + LATENCY_ITEMS) + 60
    payloads = [item_1k(i, priority="urgent") for i in range(total)]
    now = datetime.now(UTC)
    bodies = [pipeline.prepare(Intake(p, "tags", f"{prefix}.in.tags", now)).body for p in payloads]
    seqs = itertools.count(1)
    client = AsyncOpenAI(base_url=env.base_url, api_key=KEY, max_retries=0, timeout=30)

    async def via_pipeline(i: int) -> None:
        # What the NATS source does for an urgent intake message once fetched: the
        # daemon's Pipeline.process (parse, result-store lookup, route, provider call,
        # answer validation, result-store put, result event with PubAck).
        intake = Intake(payloads[i], "tags", f"{prefix}.in.tags", datetime.now(UTC), seq=next(seqs))
        event = await pipeline.process(intake)
        assert event is not None and event["status"] == "ok" and event["route"] == "sync", event

    async def raw(i: int) -> None:
        await client.chat.completions.create(**bodies[i])

    ids = iter(range(total))
    await concurrently(raw, itertools.islice(ids, 100), 64)  # warm up both
    await concurrently(via_pipeline, itertools.islice(ids, 100), 64)
    daemon_s, raw_s, daemon_ms, raw_ms = [], [], [], []
    for _ in range(rounds):
        batch = list(itertools.islice(ids, SYNC_ITEMS))
        raw_s.append(await concurrently(raw, batch, 64))
        daemon_s.append(await concurrently(via_pipeline, batch, 64))
        batch = list(itertools.islice(ids, LATENCY_ITEMS))
        raw_ms += await one_by_one(raw, batch)
        daemon_ms += await one_by_one(via_pipeline, batch)
    nats_ms = await through_nats(env, prefix, list(itertools.islice(ids, 60)), payloads)
    await client.close()
    # Rounds alternate, so each pair saw about the same machine: the median of the
    # pairs' ratios is steadier than a ratio of medians when the load drifts.
    throughput = median(r / d for r, d in zip(raw_s, daemon_s, strict=True))
    added = percentile(daemon_ms, 0.5) - percentile(raw_ms, 0.5)
    per_s = SYNC_ITEMS / median(daemon_s), SYNC_ITEMS / median(raw_s)
    return [
        Check(
            "sync",
            "throughput at 64 in flight / raw AsyncOpenAI",
            throughput,
            ">=",
            0.8,
            measured=f"{per_s[0]:,.0f} vs {per_s[1]:,.0f} requests/s",
            extra={
                "requests_per_round": SYNC_ITEMS,
                "daemon_s": [round(x, 2) for x in daemon_s],
                "raw_s": [round(x, 2) for x in raw_s],
            },
        ),
        Check(
            "sync",
            "added p50 latency, 1 at a time",
            added,
            "<=",
            5.0,
            unit="ms",
            measured=f"p50 {percentile(daemon_ms, 0.5):.2f} ms vs {percentile(raw_ms, 0.5):.2f} ms",
            extra={
                "daemon_p50_ms": round(percentile(daemon_ms, 0.5), 2),
                "raw_p50_ms": round(percentile(raw_ms, 0.5), 2),
                "daemon_p90_ms": round(percentile(daemon_ms, 0.9), 2),
                "raw_p90_ms": round(percentile(raw_ms, 0.9), 2),
                "through_nats_p50_ms": round(percentile(nats_ms, 0.5), 2),
                "through_nats_added_p50_ms": round(percentile(nats_ms, 0.5) - percentile(raw_ms, 0.5), 2),
            },
        ),
    ]


async def through_nats(env: Env, prefix: str, indices: list[int], payloads: list[bytes]) -> list[float]:
    """For information: an urgent item published to intake until its result event
    arrives on ``<prefix>.out.tags``, one at a time; milliseconds."""
    assert env.nc is not None
    js = env.js
    arrived: asyncio.Queue[bytes] = asyncio.Queue()

    async def on_event(msg: Any) -> None:
        await arrived.put(msg.data)

    sub = await env.nc.subscribe(f"{prefix}.out.tags", cb=on_event)
    out = []
    for i in indices:
        started = time.perf_counter()
        await js.publish(f"{prefix}.in.tags", payloads[i])
        while json.loads(await asyncio.wait_for(arrived.get(), 30))["id"] != json.loads(payloads[i])["id"]:
            pass
        out.append((time.perf_counter() - started) * 1000)
    await sub.unsubscribe()
    return out
