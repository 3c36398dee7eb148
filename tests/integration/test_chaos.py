"""Chaos (issue 5, must-show 1): 5,000 mixed-priority items while the provider misbehaves
— 10% 429 with retry-after, 3% 500, 1% timeouts on sync calls, one batch that expires
with partial output, one batch that fails validation. Every item must end ``ok``, or
``error`` with a code and a DLQ entry; none lost, none twice, no request paid twice; then
``enrichd dlq replay --retryable-only`` brings back the transient failures as ``ok``."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import events, read_stream
from tests.integration.test_operations import cli_env, enrichd

COUNT = 5_000
HANDLERS = ("tags", "summarize", "sentiment", "embed")
MAX_ATTEMPTS = 3


def chaos_items() -> list[tuple[str, dict[str, Any] | bytes]]:
    """(handler, item) pairs: 20% urgent, 10% high (both sync), the rest normal or low
    (batched); some items keep failing (flaky, more times than retries allow) and some
    are refused for good (HTTP 400), and a few are not valid items at all."""
    out: list[tuple[str, dict[str, Any] | bytes]] = []
    priorities = ["urgent", "urgent", "high", "normal", "normal", "normal", "normal", "normal", "low", "low"]
    for i in range(COUNT):
        handler = HANDLERS[i % 4] if i % 20 != 3 else "embed"
        text = f"Item {i}: a short note about project {i % 41} and the meeting on day {i % 28 + 1}."
        if i % 250 in (10, 17):  # 40 items, sync (10) and batched (17)
            text += f" [[emulator:flaky={MAX_ATTEMPTS}]]"
        elif i % 500 == 33:  # 10 items refused for good
            text += " [[emulator:status=400]]"
        item: dict[str, Any] | bytes = {"id": f"c{i:05d}", "text": text, "priority": priorities[i % 10]}
        if i % 1000 == 999:  # 5 bad items: a priority the contract does not know
            item = {"id": f"c{i:05d}", "text": text, "priority": "whenever"}
        out.append((handler, item))
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
async def test_chaos_every_item_ends_once_and_replay_recovers(
    make_daemon, nc, prefix, emulator, nats_url, tmp_path: Path
) -> None:
    from service.emulator import FaultConfig

    emulator.set_faults(
        FaultConfig(
            rate_429=0.10,
            retry_after_s=0.2,
            rate_500=0.03,
            rate_timeout=0.01,
            timeout_sleep_s=2.0,
            batch_delay_s=0.5,
            batch_faults_next=["expire", "fail_validation"],
        )
    )
    daemon = await make_daemon(
        batching={"max_items": 1000, "max_wait_s": 1.0, "poll_interval_s": 0.2},
        retry={"max_attempts": MAX_ATTEMPTS},
        openai={"timeout_s": 1.0},
    )
    js = nc.jetstream(publish_async_max_pending=6000)
    items = chaos_items()
    futures = [
        await js.publish_async(f"{prefix}.in.{h}", it if isinstance(it, bytes) else json.dumps(it).encode())
        for h, it in items
    ]
    await asyncio.gather(*futures)

    out_stream = daemon.subjects.stream("OUT")
    msgs = await read_stream(js, out_stream, f"{prefix}.out.*", COUNT, timeout_s=240)
    got = events(msgs)
    ids = Counter(e["id"] for e in got)
    assert len(got) == COUNT, f"{len(got)} events for {COUNT} items"
    assert len(ids) == COUNT and set(ids.values()) == {1}, "an item was lost or answered twice"

    by_id = {e["id"]: e for e in got}
    errors = {i: e for i, e in by_id.items() if e["status"] == "error"}
    assert all(e["error"] and e["error"]["code"] for e in errors.values())
    # the sync and batch paths both saw trouble and both carried on
    routes = Counter((e["route"], e["status"]) for e in got)
    assert routes[("sync", "ok")] > 1000 and routes[("batch", "ok")] > 3000, routes
    flaky = {f"c{i:05d}" for i in range(COUNT) if i % 250 in (10, 17)}
    refused = {f"c{i:05d}" for i in range(COUNT) if i % 500 == 33 and i % 250 not in (10, 17)}
    assert flaky <= set(errors) and refused <= set(errors)
    assert {errors[i]["error"]["code"] for i in refused} == {"bad_request"}
    assert all(errors[i]["error"]["retryable"] for i in flaky)
    # the faults really happened
    stats = emulator.stats
    injected = stats["faults_injected"]
    assert injected.get("rate_429", 0) > 50 and injected.get("rate_500", 0) > 10, injected
    assert injected.get("rate_timeout", 0) > 0, injected
    batch_events = events(
        await read_stream(js, daemon.subjects.stream("EVENTS"), f"{prefix}.events.batch.*", 1, timeout_s=5)
    )
    assert batch_events
    # no batch request paid twice (a custom_id is the same on every resubmission)
    assert set(stats["custom_ids_succeeded"].values()) == {1}

    # every error has exactly one DLQ entry carrying the code, attempts and item
    env = cli_env(tmp_path, nats_url, prefix, emulator.base_url)
    listing = await enrichd("dlq", "list", "--json", env=env, timeout_s=120)
    dlq = json.loads(listing.stdout)
    dlq_ids = Counter(d["id"] for d in dlq)
    assert set(dlq_ids) == set(errors) and set(dlq_ids.values()) == {1}
    for entry in dlq:
        assert entry["error"]["code"] == errors[entry["id"]]["error"]["code"]
        assert entry["attempts"] == errors[entry["id"]]["attempts"]

    # replay the transient failures once the provider is healthy again
    emulator.set_faults(FaultConfig(batch_delay_s=0.2))
    replayable = {d["id"] for d in dlq if d["error"]["retryable"]}
    assert flaky <= replayable
    replay = await enrichd("dlq", "replay", "--retryable-only", env=env, timeout_s=120)
    assert f"replayed {len(replayable)} item(s)" in replay.stdout, replay.stdout + replay.stderr
    more = events(await read_stream(js, out_stream, f"{prefix}.out.*", COUNT + len(replayable), timeout_s=60))
    again = {e["id"]: e for e in more[COUNT:]}
    assert set(again) == replayable and len(more) == COUNT + len(replayable)
    assert all(e["status"] == "ok" for e in again.values()), [
        e for e in again.values() if e["status"] != "ok"
    ]
    # what was refused for good is still in the DLQ, and only that
    left = json.loads((await enrichd("dlq", "list", "--json", env=env, timeout_s=60)).stdout)
    assert {d["id"] for d in left} == set(errors) - replayable
    assert not any(d["error"]["retryable"] for d in left)
    print(
        f"chaos: {COUNT} items, routes {dict(routes)}, faults {injected}, "
        f"{len(errors)} errors ({Counter(e['error']['code'] for e in errors.values())}), "
        f"replayed {len(replayable)} -> ok, {len(left)} left in the DLQ"
    )
