"""CONTRACT §11: the flex route and promotion, against the emulator over real HTTP.

- With ``routing.flex``, deadline work the batch path cannot meet goes ``flex`` (seen on
  the wire as ``service_tier: "flex"``), work without a deadline goes ``batch``, urgent
  work ``sync``.
- A refused flex call is tried on flex again while the deadline allows, then sync: with
  30% of flex calls refused every item still ends ``ok``.
- An item buffered, or inside a provider batch, whose deadline comes within
  ``routing.promote_margin_s`` is promoted and answered exactly once.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from service.emulator import FaultConfig
from tests.conftest import events, publish_items, read_stream

FLEX_MODEL = "gpt-5-mini"  # has a flex price in the default price table


def _deadline(seconds: float) -> str:
    return (datetime.now(UTC) + timedelta(seconds=seconds)).isoformat().replace("+00:00", "Z")


def _settings(**routing: Any) -> dict[str, Any]:
    return {
        "handlers": {"tags": {"model": FLEX_MODEL}},
        "routing": {"flex": True, "flex_timeout_s": 2.0, **routing},
    }


async def _out(js: Any, daemon: Any, prefix: str, count: int, timeout_s: float = 30) -> list[dict[str, Any]]:
    msgs = await read_stream(
        js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", count, timeout_s=timeout_s
    )
    return events(msgs)


async def test_deadline_work_goes_flex_the_rest_batch_or_sync(make_daemon, nc, prefix, emulator) -> None:
    emulator.reset_stats()
    daemon = await make_daemon(
        **_settings(),
        batching={"max_latency_s": 3600, "max_wait_s": 0.5, "poll_interval_s": 0.2},
    )
    js = nc.jetstream()
    items = [{"id": f"d{i}", "text": f"deadline item {i}", "deadline": _deadline(1800)} for i in range(10)]
    items += [{"id": f"n{i}", "text": f"no deadline {i}"} for i in range(10)]
    items += [{"id": f"u{i}", "text": f"urgent {i}", "priority": "urgent"} for i in range(5)]
    await publish_items(js, f"{prefix}.in.tags", items)
    out = await _out(js, daemon, prefix, len(items))
    routes = {e["id"]: e["route"] for e in out}
    assert len(out) == len(items) and all(e["status"] == "ok" for e in out)
    assert {routes[f"d{i}"] for i in range(10)} == {"flex"}
    assert {routes[f"n{i}"] for i in range(10)} == {"batch"}
    assert {routes[f"u{i}"] for i in range(5)} == {"sync"}
    stats = emulator.stats
    assert stats["requests_by_tier"].get("flex") == 10  # seen on the wire
    # flex is billed at the batch rate: half of what the same usage costs on sync
    flex = next(e for e in out if e["route"] == "flex")
    assert (
        flex["cost_usd"] is not None and flex["handler_version"] == daemon.settings.registry["tags"].version
    )


async def test_flex_refusals_are_retried_then_sent_sync(make_daemon, nc, prefix, emulator) -> None:
    emulator.reset_stats()
    emulator.set_faults(FaultConfig(flex_unavailable_rate=0.3))
    try:
        daemon = await make_daemon(
            **_settings(),
            batching={"max_latency_s": 3600, "max_wait_s": 600},
            retry={"base_s": 0.05, "max_backoff_s": 0.2},
        )
        js = nc.jetstream()
        items = [{"id": f"r{i}", "text": f"refusable {i}", "deadline": _deadline(1800)} for i in range(40)]
        await publish_items(js, f"{prefix}.in.tags", items)
        out = await _out(js, daemon, prefix, len(items))
    finally:
        emulator.set_faults(FaultConfig())
    assert sorted(e["id"] for e in out) == sorted(i["id"] for i in items)
    assert all(e["status"] == "ok" for e in out)
    stats = emulator.stats
    assert stats["flex_refusals"] > 0
    assert stats["requests_by_tier"]["flex"] == 40 + stats["flex_refusals"]  # each refusal tried again


async def test_refused_flex_goes_sync_when_the_deadline_is_near(make_daemon, nc, prefix, emulator) -> None:
    emulator.reset_stats()
    emulator.set_faults(FaultConfig(flex_unavailable_rate=1.0))
    try:
        # flex_lead_s = 2 + 30: a deadline 34 s away leaves room for one flex try only (a
        # second one, after a backoff of at least 5 s, would leave less than the lead)
        daemon = await make_daemon(
            **_settings(),
            batching={"max_latency_s": 3600, "max_wait_s": 600},
            retry={"base_s": 10.0, "max_backoff_s": 20.0},
        )
        js = nc.jetstream()
        await publish_items(js, f"{prefix}.in.tags", [{"id": "near", "text": "x", "deadline": _deadline(34)}])
        [event] = await _out(js, daemon, prefix, 1)
    finally:
        emulator.set_faults(FaultConfig())
    assert event["status"] == "ok" and event["route"] == "sync"
    assert emulator.stats["requests_by_tier"] == {"flex": 1, "default": 1}


async def test_a_buffered_item_near_its_deadline_is_promoted_once(make_daemon, nc, prefix, emulator) -> None:
    emulator.reset_stats()
    # The batch path answers within 30 s; the item's deadline is 5 minutes away, so it is
    # buffered, and promoted once it is within the 290 s margin (about 10 s later).
    daemon = await make_daemon(
        **_settings(promote_margin_s=290),
        batching={"max_latency_s": 30, "max_wait_s": 600, "poll_interval_s": 0.2},
    )
    js = nc.jetstream()
    items = [{"id": "soon", "text": "answer me within five minutes", "deadline": _deadline(300)}]
    items += [{"id": "later", "text": "no hurry"}]
    await publish_items(js, f"{prefix}.in.tags", items)
    await asyncio.sleep(1)
    assert daemon.pipeline.counters.buffered == 2
    [event] = await _out(js, daemon, prefix, 1, timeout_s=30)
    assert event["id"] == "soon" and event["route"] == "flex" and event["status"] == "ok"
    # The buffer is flushed now: the promoted item is taken out, not sent in the batch.
    subject = next(iter(await daemon.batcher.flusher.buffer_states()))
    await daemon.batcher.flush(subject)
    out = await _out(js, daemon, prefix, 3, timeout_s=8)
    assert sorted(e["id"] for e in out) == ["later", "soon"]
    assert [e["route"] for e in out if e["id"] == "later"] == ["batch"]
    assert emulator.stats["batch_lines_total"] == 1  # only "later" went into the batch


async def test_an_item_inside_a_batch_near_its_deadline_is_promoted_once(
    make_daemon, nc, prefix, emulator
) -> None:
    emulator.reset_stats()
    emulator.set_faults(FaultConfig(batch_delay_s=15))
    try:
        daemon = await make_daemon(
            **_settings(promote_margin_s=290),
            batching={"max_latency_s": 30, "max_wait_s": 0.3, "poll_interval_s": 0.3},
        )
        js = nc.jetstream()
        items = [{"id": "inbatch", "text": "in a slow batch", "deadline": _deadline(300)}]
        items += [{"id": "other", "text": "no deadline"}]
        await publish_items(js, f"{prefix}.in.tags", items)
        [first] = await _out(js, daemon, prefix, 1, timeout_s=30)
        assert first["id"] == "inbatch" and first["route"] == "flex"
        # the batch completes later: its answer for the promoted item is never published
        await read_stream(
            js, daemon.subjects.stream("EVENTS"), f"{prefix}.events.batch.completed", 1, timeout_s=40
        )
        out = await _out(js, daemon, prefix, 3, timeout_s=5)
    finally:
        emulator.set_faults(FaultConfig())
    assert sorted(e["id"] for e in out) == ["inbatch", "other"]
    assert daemon.batcher.publisher.tally["promoted"] == 1


async def test_an_item_the_batch_ended_with_an_error_is_not_promoted_afterwards(
    make_daemon, nc, prefix, emulator
) -> None:
    emulator.reset_stats()
    daemon = await make_daemon(
        **_settings(promote_margin_s=290),
        batching={"max_latency_s": 30, "max_wait_s": 0.3, "poll_interval_s": 0.2},
    )
    js = nc.jetstream()
    # buffered (its deadline is past the batch path's 30 s), flushed at once, and refused
    # by the model in the batch: an error ending, 10 s before its promotion would be due
    item = {"id": "refused", "text": "no [[emulator:refusal]]", "deadline": _deadline(300)}
    await publish_items(js, f"{prefix}.in.tags", [item])
    [event] = await _out(js, daemon, prefix, 1, timeout_s=20)
    assert event["status"] == "error" and event["route"] == "batch"
    await asyncio.sleep(14)  # past the time it was due for promotion
    out = await _out(js, daemon, prefix, 2, timeout_s=2)
    assert len(out) == 1  # no second answer for that intake message
    assert emulator.stats["requests_by_tier"] == {}  # no sync or flex call was made for it


async def test_a_due_item_left_first_in_its_buffer_does_not_stop_later_flushes(
    make_daemon, nc, prefix, emulator
) -> None:
    """After a restart a flush finds an item already due first in its buffer: it is left
    there (and promoted) while the rest are flushed; when it comes back, first again, the
    next flush must still go out (the first name is the earlier flush's)."""
    emulator.reset_stats()
    js = nc.jetstream()
    first = await make_daemon(
        **_settings(promote_margin_s=10), batching={"max_latency_s": 30, "max_wait_s": 600}
    )
    await publish_items(
        js, f"{prefix}.in.tags", [{"id": "due", "text": "soon due", "deadline": _deadline(285)}]
    )
    await publish_items(js, f"{prefix}.in.tags", [{"id": "a1", "text": "no hurry"}])
    await asyncio.sleep(1)
    assert first.pipeline.counters.buffered == 2
    await first.stop()  # the promotion schedule is gone with it; the buffer is not
    daemon = await make_daemon(
        **_settings(promote_margin_s=290),
        batching={"max_latency_s": 30, "max_wait_s": 0.3, "poll_interval_s": 0.2},
    )
    out = await _out(js, daemon, prefix, 2, timeout_s=20)
    assert sorted(e["id"] for e in out) == ["a1", "due"]
    assert {e["id"]: e["route"] for e in out} == {"a1": "batch", "due": "flex"}
    await asyncio.sleep(6)  # the promoted item comes back to the buffer, marked, and first
    await publish_items(js, f"{prefix}.in.tags", [{"id": "a2", "text": "later still"}])
    out = await _out(js, daemon, prefix, 3, timeout_s=20)
    assert sorted(e["id"] for e in out) == ["a1", "a2", "due"]
    assert emulator.stats["batches_created"] == 2
