"""Daily budget: spending stops at the cap, `budget.exceeded` is published once, and the
waiting items are processed after the budget day turns (injectable clock)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

from tests.conftest import events, read_stream


class Clock:
    def __init__(self) -> None:
        self.now = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now


async def test_budget_caps_spend_then_resumes_next_day(make_daemon, nc, prefix, emulator) -> None:
    clock = Clock()
    cap = 0.0003  # a request's upper bound is ~5.5e-5 USD, its real cost ~1.3e-5
    daemon = await make_daemon(
        clock=clock,
        budget={"daily_usd": cap, "recheck_s": 0.3},
        batching={"max_wait_s": 0.3, "poll_interval_s": 0.2},
    )
    js = nc.jetstream()
    total = 40
    for i in range(total):
        item = {"id": f"b{i:02d}", "text": f"budgeted item number {i}", "priority": "urgent"}
        await js.publish(f"{prefix}.in.tags", json.dumps(item).encode())
    out_subject = f"{prefix}.out.tags"
    exceeded = events(
        await read_stream(js, daemon.subjects.stream("EVENTS"), f"{prefix}.events.budget.exceeded", 1)
    )
    assert exceeded[0]["scope"] == "all" and exceeded[0]["cap_usd"] == cap
    first_day = events(await read_stream(js, daemon.subjects.stream("OUT"), out_subject, total, timeout_s=3))
    assert 0 < len(first_day) < total
    # spending stopped before the cap: nothing overshoots, not even by one request
    assert (await daemon.pipeline.ledger.spent())["sync"] <= cap
    assert sum(e["cost_usd"] for e in first_day) <= cap
    again = await read_stream(
        js, daemon.subjects.stream("EVENTS"), f"{prefix}.events.budget.exceeded", 2, timeout_s=1
    )
    assert len(again) == 1  # once per day, however often work was turned away
    alerts = events(await read_stream(js, daemon.subjects.stream("EVENTS"), f"{prefix}.events.alert", 1))
    assert alerts[0]["kind"] == "budget_exceeded"
    out: list[dict] = first_day
    for _ in range(5):  # the waiting items go on as budget days turn
        clock.now += timedelta(days=1)
        out = events(await read_stream(js, daemon.subjects.stream("OUT"), out_subject, total, timeout_s=4))
        assert (await daemon.pipeline.ledger.spent())["sync"] <= cap
        if len(out) == total:
            break
    assert sorted(e["id"] for e in out) == [f"b{i:02d}" for i in range(total)]
    assert [e["error"] for e in out if e["status"] != "ok"] == []


async def test_budget_blocks_batch_flush_until_next_day(make_daemon, nc, prefix, emulator) -> None:
    clock = Clock()
    daemon = await make_daemon(
        clock=clock,
        budget={"daily_usd": 0.0003, "recheck_s": 0.3},
        batching={"max_wait_s": 0.3, "poll_interval_s": 0.2},
    )
    js = nc.jetstream()
    total = 60  # billed ~6.5e-6 USD each: more than a 3e-4 day can pay for
    for i in range(total):
        await js.publish(f"{prefix}.in.tags", json.dumps({"id": f"n{i}", "text": f"batch {i}"}).encode())
    await read_stream(js, daemon.subjects.stream("EVENTS"), f"{prefix}.events.budget.exceeded", 1)
    first_day = await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", total, timeout_s=3)
    assert 0 < len(first_day) < total  # what the day's budget paid for; the rest waits in the buffer
    clock.now += timedelta(days=1)
    daemon.batcher.flusher.blocked_until.clear()  # skip the real-time recheck pause
    out = events(
        await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", total, timeout_s=30)
    )
    assert len(out) == total and all(e["route"] == "batch" for e in out)
