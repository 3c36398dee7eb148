"""Packing (CONTRACT §12) end to end, against the emulator: items of a handler with
``pack = 8`` share requests on the sync and the batch route, every item gets its own
event with its share of the usage, and items a packed answer misses are retried alone."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from typing import Any

from tests.conftest import events, read_stream

PACK8 = {"tags": {"pack": 8}}
# A longer linger than the default keeps the test from depending on how the 96 messages
# are spread over the intake's fetches.
LINGER = {"linger_s": 0.2}
FAST = {"max_wait_s": 0.5, "poll_interval_s": 0.2}


async def publish_many(js: Any, subject: str, items: list[dict[str, Any]]) -> None:
    futures = [await js.publish_async(subject, json.dumps(item).encode()) for item in items]
    await asyncio.gather(*futures)


def by_id(msgs: list[Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for e in events(msgs):
        assert e["id"] not in out, f"two events for {e['id']}"
        out[e["id"]] = e
    return out


def usage_sum(out: dict[str, dict[str, Any]]) -> tuple[int, int]:
    return (
        sum(e["usage"]["input_tokens"] for e in out.values()),
        sum(e["usage"]["output_tokens"] for e in out.values()),
    )


def urgent(n: int, tag: str = "u") -> list[dict[str, Any]]:
    return [
        {"id": f"{tag}{i:02d}", "text": f"urgent note {i} about topic {i % 7}", "priority": "urgent"}
        for i in range(n)
    ]


async def test_pack_8_on_96_urgent_items_shares_requests(make_daemon, nc, prefix, emulator) -> None:
    daemon = await make_daemon(handlers=PACK8, packing=LINGER)
    js = nc.jetstream()
    await publish_many(js, f"{prefix}.in.tags", urgent(96))
    out = by_id(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 96, timeout_s=30))
    assert len(out) == 96
    requests = emulator.stats["chat_requests_ok"]
    assert 12 <= requests <= 24, requests
    assert emulator.stats["packed_requests"] >= 12
    assert all(e["status"] == "ok" and e["route"] == "sync" and e["packed"] > 1 for e in out.values())
    assert all(isinstance(e["result"]["tags"], list) and e["cost_usd"] > 0 for e in out.values())
    assert all(e["handler_version"] == daemon.settings.registry["tags"].version for e in out.values())
    # the usage shares add up to the requests' usage as the provider counted it
    assert usage_sum(out) == (emulator.stats["tokens_in"], emulator.stats["tokens_out"])


async def test_two_items_missing_from_a_packed_answer_are_retried_alone(
    make_daemon, nc, prefix, emulator
) -> None:
    from service.emulator import FaultConfig

    daemon = await make_daemon(handlers=PACK8, packing=LINGER)
    emulator.set_faults(FaultConfig(pack_drop_next=[2]))
    js = nc.jetstream()
    await publish_many(js, f"{prefix}.in.tags", urgent(8, "d"))
    out = by_id(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 8, timeout_s=30))
    assert len(out) == 8 and all(e["status"] == "ok" for e in out.values())
    # one packed request, then the two items it missed, each alone
    assert emulator.stats["chat_requests_ok"] == 1 + 2
    assert emulator.stats["pack_answers_dropped"] == 2
    alone = sorted(i for i, e in out.items() if e["packed"] == 1)
    # the emulator drops the last two answers of the pack; which items those are depends
    # on the order the intake handed them to the packer (fetched messages run concurrently)
    assert len(alone) == 2
    assert all(out[i]["attempts"] == 2 for i in alone)
    assert all(e["packed"] == 8 and e["attempts"] == 1 for i, e in out.items() if i not in alone)
    assert usage_sum(out) == (emulator.stats["tokens_in"], emulator.stats["tokens_out"])


async def test_requests_on_enrich_sync_are_answered_alone(make_daemon, nc, prefix, emulator) -> None:
    await make_daemon(handlers=PACK8, packing=LINGER)
    asks = [json.dumps({"id": f"q{i}", "text": f"question {i}"}).encode() for i in range(3)]
    replies = await asyncio.gather(*(nc.request(f"{prefix}.sync.tags", a, timeout=10) for a in asks))
    answered = [json.loads(r.data) for r in replies]
    assert all(e["status"] == "ok" and e["packed"] == 1 for e in answered)
    assert emulator.stats["packed_requests"] == 0


async def test_pack_8_on_the_batch_route(make_daemon, nc, prefix, emulator) -> None:
    daemon = await make_daemon(handlers=PACK8, batching=FAST)
    js = nc.jetstream()
    items = [{"id": f"b{i:02d}", "text": f"normal note {i} on topic {i % 5}"} for i in range(40)]
    await publish_many(js, f"{prefix}.in.tags", items)
    out = by_id(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 40, timeout_s=40))
    assert len(out) == 40
    assert all(e["status"] == "ok" and e["route"] == "batch" and e["batch_id"] for e in out.values())
    assert all(e["packed"] > 1 for e in out.values())
    # 40 items in packs of 8: 5 lines (one more per extra flush, when the items were
    # buffered apart in time)
    batches = emulator.stats["batches_created"]
    assert emulator.stats["batch_lines_total"] <= 5 + (batches - 1)
    assert len({e["batch_id"] for e in out.values()}) == batches
    assert usage_sum(out) == (emulator.stats["tokens_in"], emulator.stats["tokens_out"])
    assert all(e["cost_usd"] > 0 for e in out.values())


async def test_batch_pack_answers_missing_items_retry_them_alone(make_daemon, nc, prefix, emulator) -> None:
    from service.emulator import FaultConfig

    daemon = await make_daemon(handlers=PACK8, batching=FAST)
    emulator.set_faults(FaultConfig(pack_drop_next=[2]))
    js = nc.jetstream()
    items = [{"id": f"m{i}", "text": f"normal note {i}"} for i in range(8)]
    await publish_many(js, f"{prefix}.in.tags", items)
    out = by_id(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 8, timeout_s=40))
    assert len(out) == 8 and all(e["status"] == "ok" and e["route"] == "batch" for e in out.values())
    alone = sorted(i for i, e in out.items() if e["packed"] == 1)
    assert alone == ["m6", "m7"]
    assert all(out[i]["attempts"] == 2 for i in alone)
    assert emulator.stats["batches_created"] == 2
    # one pack line, then the two it missed, alone
    assert emulator.stats["batch_lines_total"] == 1 + 2
    assert usage_sum(out) == (emulator.stats["tokens_in"], emulator.stats["tokens_out"])


async def test_pack_8_on_the_flex_route(make_daemon, nc, prefix, emulator) -> None:
    from service.emulator import FaultConfig

    daemon = await make_daemon(
        handlers={"tags": {"pack": 8, "model": "gpt-5-mini", "flex": True}},
        routing={"flex": True, "flex_timeout_s": 30},
        packing=LINGER,
    )
    emulator.set_faults(FaultConfig(flex_unavailable_next=1))  # the first pack is refused once
    deadline = (datetime.now(UTC) + timedelta(hours=2)).isoformat().replace("+00:00", "Z")
    js = nc.jetstream()
    items = [{"id": f"f{i:02d}", "text": f"note {i} due soon", "deadline": deadline} for i in range(24)]
    await publish_many(js, f"{prefix}.in.tags", items)
    out = by_id(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 24, timeout_s=30))
    assert len(out) == 24
    assert all(e["status"] == "ok" and e["route"] == "flex" and e["packed"] > 1 for e in out.values())
    assert emulator.stats["flex_refusals"] == 1
    assert emulator.stats["chat_ok_by_tier"].get("flex", 0) == emulator.stats["chat_requests_ok"] <= 6
    assert usage_sum(out) == (emulator.stats["tokens_in"], emulator.stats["tokens_out"])
