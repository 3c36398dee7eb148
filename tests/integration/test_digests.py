"""Digests (CONTRACT §15) against a real nats-server and the emulator: every member in
exactly one digest event, one event per window and group across replicas, through a
SIGKILL (also right after a digest event was published), and hierarchical reduction."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from nats.js import JetStreamContext

from devkit.nats import read_all
from devkit.process import DaemonProcess
from service.cli.status import collect, render
from service.contract.asyncapi import build_document
from tests.conftest import TEST_KEY
from tests.unit.test_asyncapi import assert_valid

REVIEW = {
    "model": "gpt-4.1-nano",
    "prompt": "Review these {count} results ({window_start} to {window_end}, {group}):\n{items}",
    "max_output_tokens": 60,
}


async def wait_members(
    js: JetStreamContext, prefix: str, digest: str, want: int, timeout_s: float = 90
) -> list[dict[str, Any]]:
    """The digest events, once they name at least ``want`` members in all."""
    deadline = time.monotonic() + timeout_s
    events: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        events = [
            json.loads(m.data) for m in await read_all(js, prefix.upper() + "_OUT", f"{prefix}.out.{digest}")
        ]
        if sum(e["digest"]["members"] for e in events) >= want:
            return events
        await asyncio.sleep(0.5)
    return events


async def publish_urgent(
    js: JetStreamContext, prefix: str, ids: list[str], *, mailbox: Any = None, handler: str = "tags"
) -> None:
    for n, item_id in enumerate(ids):
        item: dict[str, Any] = {
            "id": item_id,
            "text": f"digest item {item_id} about invoices and travel",
            "priority": "urgent",
        }
        if mailbox is not None:
            item["metadata"] = {"mailbox": mailbox(n)}
        await js.publish(f"{prefix}.in.{handler}", json.dumps(item).encode())


def ts(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))


async def out_times(js: JetStreamContext, prefix: str, handler: str) -> dict[str, list[datetime]]:
    """Each source result's JetStream time(s), by item id."""
    times: dict[str, list[datetime]] = {}
    for m in await read_all(js, prefix.upper() + "_OUT", f"{prefix}.out.{handler}"):
        event = json.loads(m.data)
        if event["status"] == "ok":
            times.setdefault(event["id"], []).append(m.metadata.timestamp)
    return times


def check_exactly_once(
    events: list[dict[str, Any]], ids: list[str], times: dict[str, list[datetime]]
) -> None:
    seen = Counter(i for e in events for i in e["digest"]["member_ids"])
    assert set(seen) == set(ids), (
        f"missing {sorted(set(ids) - set(seen))[:5]}, extra {sorted(set(seen) - set(ids))[:5]}"
    )
    assert set(seen.values()) == {1}, f"in two digests: {[k for k, v in seen.items() if v > 1][:5]}"
    for e in events:
        d = e["digest"]
        assert e["status"] == "ok" and isinstance(e["result"], str) and e["result"]
        assert d["members"] == len(d["member_ids"]) > 0  # an empty window emits nothing
        start, end = ts(d["window_start"]), ts(d["window_end"])
        for member in d["member_ids"]:
            assert any(start <= t < end for t in times[member]), (member, d, times[member])


async def test_every_member_in_exactly_one_digest(make_daemon, nc, prefix, emulator) -> None:
    daemon = await make_daemon(
        handlers={"review": REVIEW},
        digests={"grace_s": 1, "quick": {"source": "tags", "every": "3s", "handler": "review"}},
    )
    js = nc.jetstream()
    ids = [f"a{i:03d}" for i in range(200)]
    for part in range(4):  # spread over a few windows
        await publish_urgent(js, prefix, ids[part * 50 : (part + 1) * 50])
        await asyncio.sleep(2.0)
    status = await collect(daemon.settings)  # `enrichd status` shows the open window
    (row,) = status["digests"]
    assert (
        row["digest"] == "quick" and row["schedule"] == "every 3s" and row["closes_at"] > row["window_start"]
    )
    assert 0 <= row["members_so_far"] <= len(ids)
    render(status)
    events = await wait_members(js, prefix, "quick", len(ids))
    check_exactly_once(events, ids, await out_times(js, prefix, "tags"))
    assert all(
        e["handler"] == "quick" and e["route"] == "sync" and e["usage"]["input_tokens"] > 0 for e in events
    )
    assert len({e["digest"]["window_start"] for e in events}) == len(events) >= 2
    assert emulator.stats["requests_by_model"].get("gpt-4.1-nano", 0) == len(events)
    # later windows without members emit nothing
    closed = len(events)
    await asyncio.sleep(7.0)
    again = await read_all(js, prefix.upper() + "_OUT", f"{prefix}.out.quick")
    assert len(again) == closed
    lifecycle = [
        json.loads(m.data)
        for m in await read_all(js, prefix.upper() + "_EVENTS", f"{prefix}.events.digest.closed")
    ]
    assert sorted(e["window_start"] for e in lifecycle) == sorted(e["digest"]["window_start"] for e in events)
    assert sum(e["members"] for e in lifecycle) == len(ids)
    doc = build_document()  # the events match docs/asyncapi.json
    for event in events:
        assert_valid(doc, "ResultEvent", event)
    for body in lifecycle:
        assert_valid(doc, "DigestClosedEvent", body)


async def test_three_replicas_one_digest_per_window_and_group(
    make_daemon, nc, prefix, emulator, tmp_path
) -> None:
    config = {
        "handlers": {"review": REVIEW},
        "digests": {
            "grace_s": 1,
            "lease_s": 10,
            "boxes": {"source": "tags", "every": "4s", "handler": "review", "group_by": "metadata.mailbox"},
        },
    }
    for n in range(3):
        await make_daemon(instance_id=f"replica{n}", state_dir=tmp_path / f"state{n}", **config)
    js = nc.jetstream()
    ids = [f"b{i:03d}" for i in range(150)]
    boxes = ["ops", "sales", "legal"]
    for part in range(3):
        await publish_urgent(js, prefix, ids[part * 50 : (part + 1) * 50], mailbox=lambda n: boxes[n % 3])
        await asyncio.sleep(2.5)
    events = await wait_members(js, prefix, "boxes", len(ids))
    check_exactly_once(events, ids, await out_times(js, prefix, "tags"))
    keys = Counter((e["digest"]["window_start"], e["digest"]["group"]) for e in events)
    assert set(keys.values()) == {1}, keys
    assert {e["digest"]["group"] for e in events} == set(boxes)
    assert emulator.stats["requests_by_model"].get("gpt-4.1-nano", 0) == len(events)  # no window run twice


async def test_members_beyond_the_context_are_reduced_hierarchically(
    make_daemon, nc, prefix, emulator
) -> None:
    await make_daemon(
        handlers={"review": {**REVIEW, "max_output_tokens": 40}},
        digests={
            "grace_s": 1,
            "small": {"source": "tags", "every": "6s", "handler": "review", "context_tokens": 400},
        },
    )
    js = nc.jetstream()
    ids = [f"c{i:03d}" for i in range(80)]
    await publish_urgent(js, prefix, ids)
    events = await wait_members(js, prefix, "small", len(ids))
    check_exactly_once(events, ids, await out_times(js, prefix, "tags"))
    calls = emulator.stats["requests_by_model"].get("gpt-4.1-nano", 0)
    assert calls == sum(e["attempts"] for e in events)  # chunk calls + reduce calls, each once
    assert max(e["attempts"] for e in events) > 2  # at least two chunks and their reduction
    big = max(events, key=lambda e: e["attempts"])
    assert big["usage"]["input_tokens"] > 400 and big["cost_usd"] > 0  # sums of every call


async def test_a_permanent_failure_is_an_error_event_and_a_dlq_entry_once(make_daemon, nc, prefix) -> None:
    # the prompt and the answer leave no room for items in a 256-token context: permanent
    await make_daemon(
        handlers={"review": {**REVIEW, "max_output_tokens": 300}},
        digests={
            "grace_s": 1,
            "doomed": {"source": "tags", "every": "3s", "handler": "review", "context_tokens": 256},
        },
    )
    js = nc.jetstream()
    ids = [f"e{i:03d}" for i in range(12)]
    await publish_urgent(js, prefix, ids)
    events = await wait_members(js, prefix, "doomed", len(ids))
    await asyncio.sleep(4.0)  # a window later: the failed window is not run again
    again = [json.loads(m.data) for m in await read_all(js, prefix.upper() + "_OUT", f"{prefix}.out.doomed")]
    assert len(again) == len(events)
    assert sorted(i for e in events for i in e["digest"]["member_ids"]) == ids
    for e in events:
        assert e["status"] == "error" and e["result"] is None
        assert e["error"]["code"] == "digest_context_too_small" and e["error"]["retryable"] is False
    dlq = [json.loads(m.data) for m in await read_all(js, prefix.upper() + "_DLQ", f"{prefix}.dlq.doomed")]
    assert sorted(d["id"] for d in dlq) == sorted(e["id"] for e in events)
    assert all(d["item"] is None and d["digest"]["members"] > 0 for d in dlq)  # the descriptor, no text
    failed = [
        json.loads(m.data)
        for m in await read_all(js, prefix.upper() + "_EVENTS", f"{prefix}.events.digest.failed")
    ]
    assert sorted(f["window_start"] for f in failed) == sorted(e["digest"]["window_start"] for e in events)
    doc = build_document()
    for body in failed:
        assert_valid(doc, "DigestFailedEvent", body)


async def test_the_out_stream_keeps_twice_the_longest_window(make_daemon, nc, prefix, tmp_path) -> None:
    digests = {"long": {"source": "tags", "every": "5d", "handler": "review"}}
    await make_daemon(handlers={"review": REVIEW}, digests=digests)
    js = nc.jetstream()
    info = await js.stream_info(prefix.upper() + "_OUT")
    assert info.config.max_age >= 10 * 86_400  # raised from the default 7 days
    raised = info.config.max_age
    short = {"short": {"source": "tags", "every": "1m", "handler": "review"}}
    await make_daemon(
        handlers={"review": REVIEW}, digests=short, instance_id="other", state_dir=tmp_path / "s2"
    )
    assert (await js.stream_info(prefix.upper() + "_OUT")).config.max_age == raised  # never lowered


def daemon_env(tmp_path: Path, nats_url: str, prefix: str, base_url: str, config: str) -> dict[str, str]:
    path = tmp_path / "digests.toml"
    path.write_text(config)
    return {
        "ENRICHD_CONFIG": str(path),
        "ENRICHD_STATE_DIR": str(tmp_path / "state"),
        "ENRICHD_NATS__URL": nats_url,
        "ENRICHD_NATS__SUBJECT_PREFIX": prefix,
        "ENRICHD_NATS__ACK_WAIT_S": "3",
        "ENRICHD_OPENAI__BASE_URL": base_url,
        "ENRICHD_OPENAI__API_KEY": TEST_KEY,
        "ENRICHD_TELEMETRY__METRICS_PORT": "0",
        "ENRICHD_FOLDERS__ENABLED": "false",
    }


GRACE = timedelta(seconds=1)
CRASH_CONFIG = """
[handlers.review]
model = "gpt-4.1-nano"
prompt = "Review {count} results:\\n{items}"
max_output_tokens = 60

[digests]
grace_s = 1
lease_s = 6

[digests.crashy]
source = "tags"
every = "3s"
handler = "review"
"""


@pytest.mark.slow
@pytest.mark.parametrize("failpoint", [None, "digest_after_publish"])
async def test_sigkill_mid_window_then_restart(failpoint, nats_url, nc, prefix, emulator, tmp_path) -> None:
    env = daemon_env(tmp_path, nats_url, prefix, emulator.base_url, CRASH_CONFIG)
    daemon = DaemonProcess(env, tmp_path / "daemon.log")
    extra = {"ENRICHD_FAILPOINT": failpoint, "ENRICHD_FAILPOINT_AFTER": "1"} if failpoint else {}
    daemon.start(extra_env=extra)
    js = nc.jetstream()
    ids = [f"k{i:03d}" for i in range(120)]
    await publish_urgent(js, prefix, ids[:60])
    await asyncio.sleep(4.0)
    await publish_urgent(js, prefix, ids[60:90])
    if failpoint:
        code = await asyncio.to_thread(daemon.wait_exit, 60)
    else:
        await asyncio.sleep(1.0)  # mid-window
        daemon.kill()
        code = await asyncio.to_thread(daemon.wait_exit, 10)
    assert code == -9, daemon.log_tail()
    killed_at = datetime.now(UTC)
    await asyncio.sleep(4.0)  # at least one window closes while no daemon runs
    restarted_at = datetime.now(UTC)
    daemon.start()
    try:
        await publish_urgent(js, prefix, ids[90:])
        events = await wait_members(js, prefix, "crashy", len(ids))
    finally:
        assert daemon.terminate() == 0, daemon.log_tail()
    times = await out_times(js, prefix, "tags")
    # items in flight at the kill are answered again after the restart: each id is one member
    check_exactly_once(events, ids, times)
    assert len({(e["digest"]["window_start"], e["digest"]["group"]) for e in events}) == len(events)
    closed_while_down = [
        e for e in events if killed_at < ts(e["digest"]["window_end"]) + GRACE < restarted_at
    ]
    if failpoint is not None:  # the re-run after the kill took the stored answer: no call paid twice
        assert emulator.stats["requests_by_model"].get("gpt-4.1-nano", 0) == len(events)
    if failpoint is None:  # killed mid-window by the test: the next window closed while down
        assert closed_while_down, "no window closed while the daemon was down"
