"""Alerts on enrich.events.alert from a running daemon (issue 6, must-show 3)."""

from __future__ import annotations

import json

from tests.conftest import events, read_stream


async def test_failure_rate_alert_when_ten_percent_of_requests_fail(
    make_daemon, nc, prefix, emulator
) -> None:
    from service.emulator import FaultConfig

    emulator.set_faults(FaultConfig(rate_500=0.10))
    daemon = await make_daemon(
        retry={"max_attempts": 1},
        alerts={"window_s": 60, "min_items": 50, "failure_rate": 0.05},
    )
    js = nc.jetstream()
    for i in range(200):
        item = {"id": f"a{i}", "text": f"note {i} about the quarterly plan", "priority": "urgent"}
        await js.publish(f"{prefix}.in.tags", json.dumps(item).encode())
    got = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 200))
    failed = sum(e["status"] == "error" for e in got)
    assert len(got) == 200 and 0.05 * 200 < failed < 0.2 * 200, failed
    alerts = events(await read_stream(js, daemon.subjects.stream("EVENTS"), f"{prefix}.events.alert", 1))
    assert alerts, "no alert"
    alert = alerts[0]
    assert alert["kind"] == "failure_rate" and alert["rate"] > 0.05 and alert["results"] >= 50
    assert alert["message"] and alert["at"] and alert["instance"]
    # once per cooldown: no second failure_rate alert
    more = events(await read_stream(js, daemon.subjects.stream("EVENTS"), f"{prefix}.events.alert", 2, 1.0))
    assert [a["kind"] for a in more] == ["failure_rate"]


async def test_batch_older_than_its_sla_is_alerted(make_daemon, nc, prefix, emulator) -> None:
    from service.emulator import FaultConfig

    emulator.set_faults(FaultConfig(batch_delay_s=30))
    daemon = await make_daemon(
        batching={"max_wait_s": 0.2, "poll_interval_s": 0.2},
        alerts={"batch_sla_s": 0.5},
    )
    js = nc.jetstream()
    await js.publish(f"{prefix}.in.tags", json.dumps({"id": "slow", "text": "a slow batch"}).encode())
    alerts = events(
        await read_stream(js, daemon.subjects.stream("EVENTS"), f"{prefix}.events.alert", 1, timeout_s=15)
    )
    assert alerts and alerts[0]["kind"] == "batch_sla"
    assert alerts[0]["batch_id"].startswith("batch_") and alerts[0]["age_s"] >= 0
