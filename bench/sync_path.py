"""Ratio benchmarks of the sync path (4) and of the cost of a mixed workload (6)."""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import random
import re
import socket
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any

from bench.harness import KEY, ROOT, Check, Env, item_1k, median

SYNC_ITEMS = 800  # per round, at 64 in flight
LATENCY_ITEMS = 100  # per round, one at a time
MIX_ITEMS = 10_000


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


# -- 6. cost of a mixed workload ------------------------------------------------------------


def fixture_items() -> list[tuple[str, dict[str, Any]]]:
    """(handler, item) for every sample email (summarize) and note (tags), parsed by the
    daemon's own file formats (service/core/formats.py), as the folder source reads them."""
    from service.core.formats import iter_file

    out = []
    for folder, handler in (("emails", "summarize"), ("notes", "tags")):
        for path in sorted((ROOT / "tests" / "fixtures" / folder).rglob("*")):
            if path.is_file() and not path.name.startswith("LICENSE"):
                for entry in iter_file(path.name, io.BytesIO(path.read_bytes())):
                    if isinstance(entry, dict):
                        out.append((handler, entry))
    return out


def mixed_workload(count: int, *, urgent: float = 0.2, duplicates: float = 0.1) -> list[tuple[str, bytes]]:
    """``count`` intake messages (handler, payload): the samples repeated under distinct
    ids, ``urgent`` of them urgent, and ``duplicates`` of them exact copies (same bytes) of
    an earlier message, published some time after it."""
    rng = random.Random(6)
    samples = fixture_items()
    unique = count - int(count * duplicates)
    messages: list[tuple[float, str, bytes]] = []
    for i in range(unique):
        handler, sample = samples[i % len(samples)]
        item = {**sample, "id": f"mix-{i:05d}", "priority": "urgent" if rng.random() < urgent else "normal"}
        messages.append((float(i), handler, json.dumps(item).encode()))
    for _ in range(count - unique):
        at, handler, payload = messages[rng.randrange(unique)]
        messages.append((rng.uniform(at + 1, unique), handler, payload))
    messages.sort(key=lambda m: m[0])
    return [(handler, payload) for _, handler, payload in messages]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape_cost(port: int) -> dict[str, float]:
    """USD by route from the daemon's own ``enrichd.cost`` counter on /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:  # noqa: S310
        text = response.read().decode()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("enrichd_cost") and "_total{" in line:
            route = re.search(r'route="([^"]+)"', line)
            if route:
                out[route.group(1)] = out.get(route.group(1), 0.0) + float(line.rsplit(" ", 1)[1])
    return out


async def settled(env: Env, daemon: Any) -> bool:
    """Every intake message acked, the buffers empty and every batch published."""
    js = env.js
    consumer = await js.consumer_info(daemon.subjects.stream("IN"), daemon.settings.nats.consumer)
    if consumer.num_pending or consumer.num_ack_pending:
        return False
    if (await js.stream_info(daemon.subjects.stream("BUFFER"))).state.messages:
        return False
    records = await daemon.batcher.store.all()
    return bool(records) and all(r.state == "published" for r in records)


async def sync_baseline(env: Env, daemon: Any, messages: list[tuple[str, bytes]]) -> tuple[float, int]:
    """Every message on its own as a sync chat completion (raw AsyncOpenAI; the request
    body built by the daemon's handler), priced at the sync price. (USD, provider calls).

    The emulator answers the same body with the same usage (it is seeded), and messages
    that differ only by id have the same body, so each distinct body is sent once and its
    cost counted once per message; every distinct body is sent twice to check that."""
    from openai import AsyncOpenAI

    from service.core.cost import Usage, cost_usd, price_for
    from service.core.intake import Intake

    now = datetime.now(UTC)
    pipeline = daemon.pipeline
    bodies: dict[str, tuple[dict[str, Any], str, int]] = {}
    for handler, payload in messages:
        body = pipeline.prepare(Intake(payload, handler, f"x.in.{handler}", now)).body
        spec = pipeline.config.registry[handler]
        key = json.dumps(body, sort_keys=True)
        _, _, seen = bodies.get(key, (body, spec.model, 0))
        bodies[key] = (body, spec.model, seen + 1)
    client = AsyncOpenAI(base_url=env.base_url, api_key=KEY, max_retries=0, timeout=60)
    distinct = list(bodies.values())
    usages: dict[int, set[Usage]] = {}

    async def call(i: int) -> None:
        answer = await client.chat.completions.create(**distinct[i % len(distinct)][0])
        assert answer.usage is not None
        usages.setdefault(i % len(distinct), set()).add(
            Usage(answer.usage.prompt_tokens, answer.usage.completion_tokens)
        )

    await concurrently(call, range(2 * len(distinct)), 16)
    await client.close()
    total = 0.0
    for i, (_, model, seen) in enumerate(distinct):
        (usage,) = usages[i]  # one usage per body: the emulator is deterministic
        price = price_for(model, pipeline.config.prices)
        total += seen * (
            cost_usd(usage, price, route="sync", batch_discount=pipeline.config.batch_discount) or 0.0
        )
    return total, 2 * len(distinct)


async def bench_cost(env: Env) -> list[Check]:
    prefix = "rcost"
    port = free_port()
    daemon = await env.daemon(
        prefix,
        openai={"max_concurrency": 64},
        telemetry={"metrics_port": port},
        batching={"max_wait_s": 2, "poll_interval_s": 0.5},
    )
    messages = mixed_workload(MIX_ITEMS)
    urgent = sum(b'"urgent"' in p for _, p in messages)
    dupes = len(messages) - len(set(messages))
    before = env.emulator_stats()
    js = env.js
    started = time.perf_counter()
    for handler, payload in messages:
        await js.publish_async(f"{prefix}.in.{handler}", payload)
    await js.publish_async_completed()
    deadline = time.monotonic() + 240
    while not await settled(env, daemon):
        assert time.monotonic() < deadline, "the mixed workload did not finish in time"
        await asyncio.sleep(0.5)
    took = time.perf_counter() - started
    spent = await asyncio.to_thread(scrape_cost, port)  # the daemon serves it from this loop
    stats = env.emulator_stats()
    counters = daemon.pipeline.counters
    events = (await js.stream_info(daemon.subjects.stream("OUT"))).state.messages
    baseline, calls = await sync_baseline(env, daemon, messages)
    total = sum(spent.values())
    return [
        Check(
            "cost",
            "daemon cost / every item sync",
            total / baseline,
            "<=",
            0.55,
            measured=f"${total:.4f} vs ${baseline:.4f} ({len(messages):,} items, {urgent:,} urgent, "
            f"{dupes:,} duplicates)",
            extra={
                "daemon_usd_by_route": {k: round(v, 6) for k, v in spent.items()},
                "baseline_usd": round(baseline, 6),
                "baseline_provider_calls": calls,
                "provider_sync_calls": stats["chat_requests_ok"] - before["chat_requests_ok"],
                "provider_batch_lines": stats["batch_lines_total"] - before["batch_lines_total"],
                "batches": stats["batches_created"] - before["batches_created"],
                "cached_answers": counters.cached,
                "result_events_on_out": events,
                "errors": counters.error,
                "daemon_wall_s": round(took, 1),
            },
        )
    ]
