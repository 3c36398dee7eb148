"""Cost benchmarks (issue 12): the mixed workload's cost against every item sync one by
one (6, ``cost``), billed tokens per item with packing against without (8, ``packing``),
and ``enrichd estimate``'s figures against what was billed (9, ``estimate``).

All three run the daemon as a cost-minded operator configures it, ``bench/cost.toml``
(both handlers on gpt-5-mini, ``routing.flex = true``, ``tags`` packed by 8 with a
controlled vocabulary as its system prompt), with the same handler definitions on the
baseline's side. Cost is priced with the daemon's own ``service.core.cost`` on the usage
the emulator reports, cached input tokens included, on both sides.
"""

from __future__ import annotations

import asyncio
import io
import json
import random
import re
import socket
import time
import urllib.request
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.harness import KEY, ROOT, Check, Env

CONFIG = ROOT / "bench" / "cost.toml"
MIX_ITEMS = 10_000
# Short batch timers so a run takes seconds (a flush every 2 s instead of 10 minutes):
# what a flush contains, and so the cost, is the same.
TIMERS = {"max_wait_s": 2, "poll_interval_s": 0.5}
WHATS = ("tokens", "input_tokens", "output_tokens", "usd")
PACK_ITEMS = 800  # per side of the packing benchmark
WARM_UP = 200  # items per handler before the estimate
ESTIMATED = 800  # items per handler estimated and then sent


# -- the workload ---------------------------------------------------------------------------


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


@dataclass(frozen=True)
class Message:
    handler: str
    payload: bytes
    kind: str  # "urgent", "deadline" or "normal"
    duplicate: bool = False

    @property
    def id(self) -> str:
        return str(json.loads(self.payload)["id"])


def rfc3339(ts: datetime) -> str:
    return ts.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def mixed_workload(
    count: int,
    *,
    now: datetime,
    urgent: float = 0.2,
    deadline: float = 0.3,
    duplicates: float = 0.1,
    handlers: Iterable[str] = ("summarize", "tags"),
    prefix: str = "mix",
    seed: int = 6,
) -> list[Message]:
    """``count`` intake messages: the samples repeated under distinct ids, ``urgent`` of
    them urgent, ``deadline`` of them normal with a deadline uniformly 1 to 4 hours after
    ``now``, the rest normal without one; and ``duplicates`` of them exact copies (same
    bytes) of an earlier message, published some time after it."""
    rng = random.Random(seed)
    wanted = set(handlers)
    samples = [s for s in fixture_items() if s[0] in wanted]
    unique = count - int(count * duplicates)
    messages: list[tuple[float, Message]] = []
    for i in range(unique):
        handler, sample = samples[i % len(samples)]
        draw = rng.random()
        item: dict[str, Any] = {**sample, "id": f"{prefix}-{i:05d}", "priority": "normal"}
        if draw < urgent:
            kind, item["priority"] = "urgent", "urgent"
        elif draw < urgent + deadline:
            kind, item["deadline"] = "deadline", rfc3339(now + timedelta(seconds=rng.uniform(3600, 4 * 3600)))
        else:
            kind = "normal"
        messages.append((float(i), Message(handler, json.dumps(item).encode(), kind)))
    for _ in range(count - unique):
        at, original = messages[rng.randrange(unique)]
        messages.append(
            (rng.uniform(at + 1, unique), Message(original.handler, original.payload, original.kind, True))
        )
    messages.sort(key=lambda m: m[0])
    return [m for _, m in messages]


# -- the daemon's side --------------------------------------------------------------------


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
    return all(r.state == "published" for r in records)


async def publish_and_settle(env: Env, daemon: Any, messages: list[Message], timeout_s: float) -> float:
    """Publish every message to intake at once, wait until the daemon is done; seconds."""
    js = env.js
    prefix = daemon.settings.nats.subject_prefix
    started = time.perf_counter()
    for m in messages:
        await js.publish_async(f"{prefix}.in.{m.handler}", m.payload)
    await js.publish_async_completed()
    deadline = time.monotonic() + timeout_s
    await asyncio.sleep(0.5)
    while not await settled(env, daemon):
        assert time.monotonic() < deadline, f"{len(messages)} messages not done after {timeout_s} s"
        await asyncio.sleep(0.5)
    return time.perf_counter() - started


async def read_events(env: Env, daemon: Any, *, start_seq: int = 1) -> list[dict[str, Any]]:
    """Every result event on ``<prefix>.out.>`` from ``start_seq`` on, as consumers see them."""
    from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

    js = env.js
    stream = daemon.subjects.stream("OUT")
    last = (await js.stream_info(stream)).state.last_seq
    if last < start_seq:
        return []
    config = ConsumerConfig(
        ack_policy=AckPolicy.NONE, deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq
    )
    sub = await js.pull_subscribe(daemon.subjects.out_filter, stream=stream, config=config)
    out: list[dict[str, Any]] = []
    try:
        while len(out) < last - start_seq + 1:
            for msg in await sub.fetch(1000, timeout=5):
                out.append(json.loads(msg.data))
    finally:
        await sub.unsubscribe()
    return out


async def out_last_seq(env: Env, daemon: Any) -> int:
    return int((await env.js.stream_info(daemon.subjects.stream("OUT"))).state.last_seq)


@dataclass
class Tally:
    """Sums over result events (or baseline answers)."""

    items: int = 0
    paid: int = 0  # not answered from the result store
    usd: float = 0.0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0
    packed_items: int = 0  # items that shared their request

    def add(self, usage: Any, usd: float | None, *, cached: bool = False, packed: int = 1) -> None:
        self.items += 1
        if cached:
            return
        self.paid += 1
        self.usd += usd or 0.0
        if usage is not None:
            self.input_tokens += usage.input_tokens
            self.output_tokens += usage.output_tokens
            self.cached_tokens += usage.cached_tokens
        self.packed_items += 1 if packed > 1 else 0

    def add_event(self, event: dict[str, Any]) -> None:
        from service.core.cost import Usage

        raw = event.get("usage") or {}
        usage = Usage(raw.get("input_tokens", 0), raw.get("output_tokens", 0), raw.get("cached_tokens", 0))
        self.add(
            usage, event.get("cost_usd"), cached=bool(event.get("cached")), packed=event.get("packed") or 1
        )

    @property
    def tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def per_item(self, value: float) -> float:
        return value / self.paid if self.paid else 0.0

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "items": self.items,
            "paid": self.paid,
            "usd": round(self.usd, 6),
            "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens,
            "cached_tokens": self.cached_tokens,
        }
        if self.packed_items:
            out["packed_items"] = self.packed_items
        return out


def tally_by(events: Iterable[dict[str, Any]], *keys: str) -> dict[str, Tally]:
    out: dict[str, Tally] = {}
    for event in events:
        name = "/".join(str(event.get(k)) for k in keys)
        out.setdefault(name, Tally()).add_event(event)
    return dict(sorted(out.items()))


def total(tallies: Iterable[Tally]) -> Tally:
    out = Tally()
    for t in tallies:
        for name in (
            "items",
            "paid",
            "usd",
            "input_tokens",
            "output_tokens",
            "cached_tokens",
            "packed_items",
        ):
            setattr(out, name, getattr(out, name) + getattr(t, name))
    return out


def delta(after: dict[str, Any], before: dict[str, Any], key: str) -> Any:
    a, b = after.get(key), before.get(key)
    if isinstance(a, dict):
        return {k: v - (b or {}).get(k, 0) for k, v in a.items() if v - (b or {}).get(k, 0)}
    return (a or 0) - (b or 0)


def provider_traffic(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    """What reached the emulator between two snapshots of its stats."""
    return {
        "chat_requests_ok": delta(after, before, "chat_requests_ok"),
        "chat_ok_by_tier": delta(after, before, "chat_ok_by_tier"),
        "packed_requests": delta(after, before, "packed_requests"),
        "packed_items_answered": delta(after, before, "packed_items_answered"),
        "batches": delta(after, before, "batches_created"),
        "batch_lines": delta(after, before, "batch_lines_total"),
        "flex_refusals": delta(after, before, "flex_refusals"),
        "tokens_in": delta(after, before, "tokens_in"),
        "tokens_out": delta(after, before, "tokens_out"),
        "cached_tokens": delta(after, before, "cached_tokens"),
    }


# -- the baseline: every message sync, one request each -----------------------------------


@dataclass
class Baseline:
    by_handler: dict[str, Tally] = field(default_factory=dict)
    calls: int = 0
    usd_uncached: float = 0.0  # the same answers with no input tokens read from the prompt cache

    @property
    def usd(self) -> float:
        return sum(t.usd for t in self.by_handler.values())


async def sync_baseline(env: Env, settings: Any, messages: list[Message], *, workers: int = 64) -> Baseline:
    """Every message (duplicates too) as its own sync chat completion, in publishing order,
    with the request body the daemon's handler builds for it (``HandlerSpec.build_body``
    of the same handler definitions, unpacked), over plain HTTP; each answer priced at the sync
    price with ``service.core.cost`` on the usage the emulator reported (cached tokens
    included, as on the daemon's side)."""
    import httpx2

    from service.core.cost import Usage, cost_usd, price_for, usage_from_openai
    from service.core.items import item_from_object

    discount = settings.batch_discount
    work = []
    for m in messages:
        spec = settings.registry[m.handler]
        item = item_from_object(json.loads(m.payload), m.handler)
        body = spec.build_body(item, max_tokens_param=settings.openai.max_tokens_param)
        work.append((m.handler, body, price_for(body["model"], settings.price_table)))
    out = Baseline()
    queue = iter(work)
    async with httpx2.AsyncClient(
        base_url=env.base_url,
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=60,
        limits=httpx2.Limits(max_connections=workers),
    ) as client:

        async def worker() -> None:
            for handler, body, price in queue:
                response = await client.post("/chat/completions", json=body)
                response.raise_for_status()
                usage = usage_from_openai(response.json().get("usage"))
                usd = cost_usd(usage, price, route="sync", batch_discount=discount)
                out.by_handler.setdefault(handler, Tally()).add(usage, usd)
                plain = Usage(usage.input_tokens, usage.output_tokens)
                out.usd_uncached += cost_usd(plain, price, route="sync", batch_discount=discount) or 0.0
                out.calls += 1

        await asyncio.gather(*(worker() for _ in range(workers)))
    return out


# -- 6. cost of the mixed workload --------------------------------------------------------


@dataclass
class MixRun:
    """One daemon's run of the mixed workload."""

    messages: list[Message]
    spent: dict[str, float]  # the daemon's enrichd.cost counter, by route
    traffic: dict[str, Any]
    events: list[dict[str, Any]]
    took_s: float

    @property
    def usd(self) -> float:
        return sum(self.spent.values())


async def run_mix(env: Env, prefix: str, *, ids: str, **overrides: Any) -> MixRun:
    port = free_port()
    daemon = await env.daemon(
        prefix,
        config=CONFIG,
        openai={"max_concurrency": 64},
        telemetry={"metrics_port": port},
        batching=TIMERS,
        **overrides,
    )
    messages = mixed_workload(MIX_ITEMS, now=datetime.now(UTC), prefix=ids)
    before = env.emulator_stats()
    took = await publish_and_settle(env, daemon, messages, 300)
    spent = await asyncio.to_thread(scrape_cost, port)  # the daemon serves it from this loop
    traffic = provider_traffic(env.emulator_stats(), before)
    events = await read_events(env, daemon)
    await daemon.stop()  # its loops would only add noise to what runs next
    return MixRun(messages, spent, traffic, events, took)


def uncached_usd(events: Iterable[dict[str, Any]], settings: Any) -> float:
    """What the events' usage would cost with no input tokens read from the prompt cache."""
    from service.core.cost import Usage, cost_usd, price_for

    out = 0.0
    for e in events:
        usage = e.get("usage")
        if e.get("cached") or not usage:
            continue
        price = price_for(e["model"], settings.price_table)
        plain = Usage(usage.get("input_tokens", 0), usage.get("output_tokens", 0))
        out += cost_usd(plain, price, route=e["route"], batch_discount=settings.batch_discount) or 0.0
    return out


def describe(run: MixRun, baseline_usd: float) -> str:
    kinds = Counter(m.kind for m in run.messages)
    routes = tally_by(run.events, "route")
    t = run.traffic
    paid = " / ".join(f"{r} {routes.get(r, Tally()).paid:,}" for r in ("sync", "flex", "batch"))
    return (
        f"${run.usd:.4f} vs ${baseline_usd:.4f} ({len(run.messages):,} items: {kinds['urgent']:,} urgent, "
        f"{kinds['deadline']:,} with a deadline, {sum(m.duplicate for m in run.messages):,} duplicates; "
        f"paid on {paid}; {t['chat_requests_ok']:,} provider requests + {t['batch_lines']:,} batch lines, "
        f"{t['packed_requests']:,} of them packs)"
    )


def run_extra(run: MixRun, base: Baseline, settings: Any) -> dict[str, Any]:
    routes = tally_by(run.events, "route")
    by_handler = tally_by(run.events, "handler")
    return {
        "daemon_usd_by_route": {k: round(v, 6) for k, v in run.spent.items()},
        "events_usd": round(sum(t.usd for t in routes.values()), 6),
        "ratio_by_handler": {
            h: round(t.usd / base.by_handler[h].usd, 4) for h, t in by_handler.items() if h in base.by_handler
        },
        "ratio_without_prompt_cache": round(uncached_usd(run.events, settings) / base.usd_uncached, 4),
        "daemon_by_route": {k: v.to_dict() for k, v in routes.items()},
        "daemon_by_handler_route": {
            k: v.to_dict() for k, v in tally_by(run.events, "handler", "route").items()
        },
        "provider": run.traffic,
        "result_events": len(run.events),
        "cached_answers": sum(1 for e in run.events if e.get("cached")),
        "errors": sum(1 for e in run.events if e.get("status") != "ok"),
        "items": dict(Counter(m.kind for m in run.messages if not m.duplicate))
        | {"duplicates": sum(m.duplicate for m in run.messages)},
        "daemon_wall_s": round(run.took_s, 1),
    }


async def bench_cost(env: Env) -> list[Check]:
    """The mixed workload through the operator's configuration (``tags`` packed by 8),
    then, with other ids (so no prompt prefix is shared with the first run), through the
    same configuration with ``tags`` packed by 16; then the baseline: the 10,000
    messages' bodies (the same for both runs: bodies do not hold ids) sent sync one by one."""
    first = await run_mix(env, "rcost", ids="mix")
    second = await run_mix(env, "rcost16", ids="mxb", handlers={"tags": {"pack": 16}})
    settings = env.settings("rcost", config=CONFIG)
    base = await sync_baseline(env, settings, first.messages)
    common = {
        "config": str(CONFIG.relative_to(ROOT)),
        "baseline_usd": round(base.usd, 6),
        "baseline_usd_without_prompt_cache": round(base.usd_uncached, 6),
        "baseline_by_handler": {k: v.to_dict() for k, v in base.by_handler.items()},
        "baseline_provider_calls": base.calls,
    }
    return [
        Check(
            "cost",
            "daemon cost / every item sync",
            first.usd / base.usd,
            "<=",
            0.35,
            measured=describe(first, base.usd),
            extra=common | run_extra(first, base, settings),
        ),
        Check(
            "cost",
            "the same with `tags` packed by 16",
            second.usd / base.usd,
            "<=",
            0.35,
            measured=describe(second, base.usd),
            extra=run_extra(second, base, settings),
        ),
    ]


# -- 8. tokens per item, packing against not ------------------------------------------------


def pack_variants() -> dict[str, dict[str, Any]]:
    """The ``tags`` handler overrides of each daemon: the operator's definition packed by 8
    and alone, and (for information) the built-in definition, whose system prompt is one
    short sentence, packed by 8 and alone."""
    import tomllib

    from handlers.builtin import builtin_definitions

    system = tomllib.loads(CONFIG.read_text())["handlers"]["tags"]["system"]
    builtin = builtin_definitions("", "")["tags"]["system"]
    return {
        "packed": {"pack": 8, "system": system},
        "single": {"pack": 1, "system": system},
        "builtin_packed": {"pack": 8, "system": builtin},
        "builtin_single": {"pack": 1, "system": builtin},
    }


async def bench_packing(env: Env) -> list[Check]:
    """The same 800 tag items (the sample notes under distinct ids, half urgent: sync
    route, half normal: batch route) through four daemons that differ only in the
    ``tags`` handler's ``pack``; billed tokens per item from their result events (each
    item's share of its pack; the shares add up to what the provider billed)."""
    now = datetime.now(UTC)
    results: dict[str, dict[str, Tally]] = {}
    traffic: dict[str, dict[str, Any]] = {}
    for n, (name, tags) in enumerate(pack_variants().items()):
        prefix = f"rpack{n}"
        daemon = await env.daemon(
            prefix,
            config=CONFIG,
            openai={"max_concurrency": 64},
            batching=TIMERS,
            handlers={"tags": tags},
        )
        messages = mixed_workload(
            PACK_ITEMS, now=now, urgent=0.5, deadline=0.0, duplicates=0.0, handlers=("tags",), prefix="pk"
        )
        before = env.emulator_stats()
        await publish_and_settle(env, daemon, messages, 120)
        traffic[name] = provider_traffic(env.emulator_stats(), before)
        events = await read_events(env, daemon)
        assert len(events) == PACK_ITEMS and all(e["status"] == "ok" for e in events), name
        results[name] = tally_by(events, "route") | {"all": total(tally_by(events, "route").values())}

    def ratio(a: str, b: str, route: str, what: str) -> float:
        x, y = results[a][route], results[b][route]
        return round(x.per_item(getattr(x, what)) / y.per_item(getattr(y, what)), 4)

    packed, single = results["packed"]["all"], results["single"]["all"]
    p, s = packed.per_item, single.per_item
    figures = {
        f"{a}/{b}": {
            route: {what: ratio(a, b, route, what) for what in WHATS} for route in ("all", "sync", "batch")
        }
        for a, b in (("packed", "single"), ("builtin_packed", "builtin_single"))
    }
    per_item = {
        name: {
            route: {
                "input": round(t.per_item(t.input_tokens), 1),
                "output": round(t.per_item(t.output_tokens), 1),
                "cached": round(t.per_item(t.cached_tokens), 1),
                "usd_per_1k_items": round(t.per_item(t.usd) * 1000, 5),
            }
            for route, t in r.items()
        }
        for name, r in results.items()
    }
    value = p(packed.tokens) / s(single.tokens)
    return [
        Check(
            "packing",
            "billed tokens per item, pack 8 / pack 1",
            value,
            "<=",
            0.5,
            measured=f"{p(packed.tokens):,.0f} vs {s(single.tokens):,.0f} tokens/item "
            f"(input {p(packed.input_tokens):,.0f} vs {s(single.input_tokens):,.0f}, "
            f"output {p(packed.output_tokens):.1f} vs {s(single.output_tokens):.1f}; "
            f"cost {figures['packed/single']['all']['usd']:.2f}×; {PACK_ITEMS} tags items, "
            "half sync, half batch)",
            extra={
                "ratios": figures,
                "per_item": per_item,
                "provider": traffic,
            },
        )
    ]


# -- 9. estimate against billed -----------------------------------------------------------


async def bench_estimate(env: Env) -> list[Check]:
    """A warm-up of 200 items per handler through the daemon (so the durable stats hold
    observed output tokens), then ``enrichd estimate``'s own code (``read_observed`` from
    NATS, ``estimate_records``) for the next 800 items of each handler, which are then sent:
    the estimate's tokens against the tokens billed for them (their result events)."""
    from service.cli.estimate import estimate_records, read_observed

    prefix = "rest"
    daemon = await env.daemon(prefix, config=CONFIG, openai={"max_concurrency": 64}, batching=TIMERS)
    settings = daemon.settings
    now = datetime.now(UTC)
    checks = []
    for handler in ("tags", "summarize"):
        # One stream of the mixed workload's items of this handler (no duplicates): the
        # first 200 warm up, the next 800 are estimated.
        items = mixed_workload(
            WARM_UP + ESTIMATED, now=now, duplicates=0.0, handlers=(handler,), prefix=f"e{handler[:3]}"
        )
        warm, rest = items[:WARM_UP], items[WARM_UP:]
        await publish_and_settle(env, daemon, warm, 120)
        assert daemon.stats is not None
        await daemon.stats.save()
        observed, note = await read_observed(settings)
        estimate = estimate_records(
            settings,
            handler,
            [json.loads(m.payload) for m in rest],
            observed=observed,
            stats_note=note,
            now=datetime.now(UTC),
        )
        start = await out_last_seq(env, daemon) + 1
        await publish_and_settle(env, daemon, rest, 120)
        events = [e for e in await read_events(env, daemon, start_seq=start) if e["handler"] == handler]
        assert len(events) == ESTIMATED and all(e["status"] == "ok" and not e["cached"] for e in events)
        billed = total(tally_by(events, "route").values())
        routes = Counter(e["route"] for e in events)
        est_tokens = estimate.input_tokens + estimate.output_tokens
        spec = settings.registry[handler]
        checks.append(
            Check(
                "estimate",
                f"estimated / billed tokens, {handler}" + (f" (pack {spec.pack})" if spec.pack > 1 else ""),
                est_tokens / billed.tokens,
                "within",
                1.1,
                low=0.9,
                measured=f"{est_tokens:,} vs {billed.tokens:,} tokens for {ESTIMATED} items "
                f"(input {estimate.input_tokens / billed.input_tokens:.3f}×, "
                f"output {estimate.output_tokens / billed.output_tokens:.3f}×)",
                extra={
                    "warm_up_items": WARM_UP,
                    "estimated_items": ESTIMATED,
                    "estimate": {
                        "input_tokens": estimate.input_tokens,
                        "output_tokens": estimate.output_tokens,
                        "output_per_item": estimate.output_per_item,
                        "output_basis": estimate.output_basis,
                        "observed_items": estimate.observed_items,
                        "mix": {r: v["items"] for r, v in estimate.mix.items()},
                        "mix_usd": estimate.mix_usd,
                        "stats": estimate.stats,
                    },
                    "billed": billed.to_dict() | {"routes": dict(routes)},
                    "input_ratio": round(estimate.input_tokens / billed.input_tokens, 4),
                    "output_ratio": round(estimate.output_tokens / billed.output_tokens, 4),
                    "usd_ratio": round((estimate.mix_usd or 0.0) / billed.usd, 4) if billed.usd else None,
                },
            )
        )
    return checks


# -- one mixed-workload run with other pack sizes, for exploring -----------------------------


async def explore(handlers: dict[str, dict[str, Any]]) -> dict[str, Any]:
    import tempfile

    with tempfile.TemporaryDirectory(prefix="enrichd-cost-") as tmp:
        async with Env(Path(tmp)) as env:
            run = await run_mix(env, "rx", ids="mix", handlers=handlers)
            settings = env.settings("rx", config=CONFIG, handlers=handlers)
            base = await sync_baseline(env, settings, run.messages)
    return {"ratio": round(run.usd / base.usd, 4), "measured": describe(run, base.usd)} | run_extra(
        run, base, settings
    )


def main() -> None:
    """``python -m bench.cost_mix --pack tags=8 --pack summarize=8 [--tags-system FILE]``:
    the mixed workload once with bench/cost.toml and these pack sizes (and another system
    prompt for tags), against the baseline with the same definitions; prints JSON."""
    import argparse
    import logging

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--pack", action="append", default=[], help="HANDLER=N (repeatable)")
    parser.add_argument("--tags-system", type=Path, help="a file with another system prompt for tags")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("faststream").addFilter(lambda record: record.levelno >= logging.WARNING)
    pairs = (p.split("=", 1) for p in args.pack)
    handlers: dict[str, dict[str, Any]] = {h: {"pack": int(n)} for h, n in pairs}
    if args.tags_system:
        handlers.setdefault("tags", {})["system"] = args.tags_system.read_text()
    print(json.dumps(asyncio.run(explore(handlers)), indent=1))


if __name__ == "__main__":
    main()
