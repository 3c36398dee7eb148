"""Pipelines (CONTRACT §14, issue 13 must-show 1): a three-step pipeline over the sample
emails — extract, classify, then a draft reply only for some labels — end to end, half
the emails urgent (every step a sync call) and half normal (every step through a
provider batch, one after the other: chained batches). One final event per item with
each step's result, route, version, batch id and usage; a step that fails for good ends
the item with an error naming the step, and a DLQ entry whose replay pays only for the
step that failed."""

from __future__ import annotations

import json
from typing import Any

from service.core.emails import email_item
from tests.conftest import FIXTURES, events, publish_items, read_stream

BATCHING = {"max_wait_s": 0.3, "poll_interval_s": 0.2}
HANDLERS = {
    "draft_reply": {
        "system": "You draft short, polite replies to customer emails.",
        "prompt": (
            "Draft a reply to this {steps.classify.label} email.\n"
            "People mentioned: {steps.extract.people?}\n"
            "Subject: {subject?}\n\n{text}"
        ),
        "max_output_tokens": 120,
    }
}


def triage(unless: str = "personal") -> dict[str, Any]:
    """extract → classify → draft_reply, the draft skipped for one label."""
    when = f"classify.label != '{unless}'"
    return {"triage": {"steps": ["extract", "classify", {"handler": "draft_reply", "when": when}]}}


def sample_emails() -> list[dict[str, Any]]:
    items = []
    for n, path in enumerate(sorted((FIXTURES / "emails").glob("*.eml"))):
        item = email_item(path.read_bytes())
        item["id"] = f"mail-{n:02d}"
        item["priority"] = "urgent" if n % 2 == 0 else "normal"
        items.append(item)
    return items


async def final_events(
    js: Any, daemon: Any, prefix: str, count: int, timeout_s: float = 60
) -> list[dict[str, Any]]:
    msgs = await read_stream(
        js, daemon.subjects.stream("OUT"), f"{prefix}.out.triage", count, timeout_s=timeout_s
    )
    return events(msgs)


async def test_three_steps_over_sample_emails_sync_and_chained_batches(
    make_daemon, nc, prefix, emulator
) -> None:
    js = nc.jetstream()
    daemon = await make_daemon(batching=BATCHING, handlers=HANDLERS, pipelines=triage())
    pipeline = daemon.settings.pipeline_specs["triage"]
    registry = daemon.settings.registry
    items = sample_emails()
    assert len(items) >= 10
    before = emulator.stats
    await publish_items(js, f"{prefix}.in.triage", items)
    got = await final_events(js, daemon, prefix, len(items))
    assert sorted(e["id"] for e in got) == sorted(i["id"] for i in items)
    by_id = {e["id"]: e for e in got}
    urgent = {i["id"] for i in items if i["priority"] == "urgent"}
    drafted = skipped = 0
    for event in got:
        assert event["status"] == "ok", event
        assert event["handler"] == "triage" and event["handler_version"] == pipeline.version
        steps = [s["handler"] for s in event["steps"]]
        assert steps[:2] == ["extract", "classify"]
        assert set(event["result"]) == set(steps)
        label = event["result"]["classify"]["label"]
        if label == "personal":
            assert steps == ["extract", "classify"] and event["skipped"] == ["draft_reply"]
            skipped += 1
        else:
            assert steps == ["extract", "classify", "draft_reply"] and event["skipped"] == []
            assert isinstance(event["result"]["draft_reply"], str)
            drafted += 1
        route = "sync" if event["id"] in urgent else "batch"
        for step in event["steps"]:
            assert step["route"] == route, event
            assert step["handler_version"] == registry[step["handler"]].version
            assert step["cached"] is False
            assert (step["batch_id"] is not None) == (route == "batch")
        # the sums are the steps' sums
        assert event["usage"]["input_tokens"] == sum(s["usage"]["input_tokens"] for s in event["steps"])
        assert abs(event["cost_usd"] - sum(s["cost_usd"] for s in event["steps"])) < 1e-9
        assert event["received_at"] <= event["completed_at"]
    assert drafted and (skipped or drafted == len(items))
    # chained batches: each batched item's steps went through distinct batches, in order
    for item_id in set(by_id) - urgent:
        batch_ids = [s["batch_id"] for s in by_id[item_id]["steps"]]
        assert len(set(batch_ids)) == len(batch_ids)
    after = emulator.stats
    steps_run = sum(len(e["steps"]) for e in got)
    sync_steps = sum(len(e["steps"]) for e in got if e["id"] in urgent)
    assert after["chat_requests_ok"] - before["chat_requests_ok"] == sync_steps
    assert after["batch_lines_total"] - before["batch_lines_total"] == steps_run - sync_steps
    # nothing is published under the steps' own handlers
    for handler in ("extract", "classify", "draft_reply"):
        stray = await read_stream(
            js, daemon.subjects.stream("OUT"), f"{prefix}.out.{handler}", 1, timeout_s=0.5
        )
        assert stray == []

    # the same items again: answered from the store, no provider call
    calls = emulator.stats
    await publish_items(js, f"{prefix}.in.triage", items)
    again = (await final_events(js, daemon, prefix, 2 * len(items)))[len(items) :]
    assert sorted(e["id"] for e in again) == sorted(by_id)
    assert all(e["cached"] for e in again)
    assert emulator.stats["chat_requests_ok"] == calls["chat_requests_ok"]
    assert emulator.stats["batch_lines_total"] == calls["batch_lines_total"]


async def test_a_sync_request_runs_every_step_and_replies_with_the_final_event(
    make_daemon, nc, prefix
) -> None:
    await make_daemon(handlers=HANDLERS, pipelines=triage())
    item = sample_emails()[0]
    reply = await nc.request(f"{prefix}.sync.triage", json.dumps(item).encode(), timeout=20)
    event = json.loads(reply.data)
    assert event["status"] == "ok" and event["handler"] == "triage", event
    assert [s["route"] for s in event["steps"]] == ["sync"] * len(event["steps"])
    assert set(event["result"]) >= {"extract", "classify"}
    # asked again: the stored final answer
    again = json.loads(
        (await nc.request(f"{prefix}.sync.triage", json.dumps(item).encode(), timeout=20)).data
    )
    assert again["cached"] is True and again["result"] == event["result"]


async def test_a_step_that_fails_for_good_names_the_step_and_replay_pays_only_that_step(
    make_daemon, nc, prefix, emulator, tmp_path
) -> None:
    js = nc.jetstream()
    # the draft step needs a field the items lack: it fails for good, after two steps paid
    broken = {
        "draft_reply": {
            **HANDLERS["draft_reply"],
            "prompt": "Reply to {customer_name}: {steps.classify.label}",
        }
    }
    daemon = await make_daemon(batching=BATCHING, handlers=broken, pipelines=triage("never"))
    items = [
        {"id": f"fail-{n}", "text": f"My order {n} never arrived.", "priority": "urgent"} for n in range(3)
    ]
    await publish_items(js, f"{prefix}.in.triage", items)
    got = await final_events(js, daemon, prefix, 3)
    for event in got:
        assert event["status"] == "error", event
        assert event["error"]["code"] == "missing_template_field"
        assert event["error"]["step"] == "draft_reply"
        assert [s["handler"] for s in event["steps"]] == ["extract", "classify", "draft_reply"]
        assert event["steps"][-1]["status"] == "error"
    dlq = events(
        await read_stream(js, daemon.subjects.stream("DLQ"), f"{prefix}.dlq.triage", 3, timeout_s=10)
    )
    assert sorted(d["id"] for d in dlq) == [i["id"] for i in items]
    assert all(d["handler"] == "triage" and d["error"]["step"] == "draft_reply" for d in dlq)
    await daemon.stop()

    # fixed, and the dead letters sent again: the two finished steps come from the store
    fixed = await make_daemon(batching=BATCHING, handlers=HANDLERS, pipelines=triage("never"))
    calls = emulator.stats["chat_requests_ok"]
    for entry in dlq:
        await js.publish(f"{prefix}.in.{entry['handler']}", json.dumps(entry["item"]).encode())
    replayed = (await final_events(js, fixed, prefix, 6))[3:]
    for event in replayed:
        assert event["status"] == "ok", event
        cached = {s["handler"]: s["cached"] for s in event["steps"]}
        assert cached == {"extract": True, "classify": True, "draft_reply": False}
    assert emulator.stats["chat_requests_ok"] - calls == 3  # one draft per item, nothing else


async def test_bad_pipeline_definitions_are_refused_naming_the_key(
    tmp_path, nats_url, prefix, emulator
) -> None:
    from service.settings import ConfigError
    from tests.conftest import settings_for

    cases = {
        "pipelines.p.steps[1]": {"p": {"steps": ["extract", "nosuch"]}},
        "pipelines.b.steps[1]: 'a' makes a loop": {"a": {"steps": ["b"]}, "b": {"steps": ["extract", "a"]}},
        "pipelines.p.steps[0].when": {
            "p": {"steps": [{"handler": "extract", "when": "classify.label == 'x'"}]}
        },
    }
    for key, tables in cases.items():
        try:
            settings_for(tmp_path, nats_url, prefix, emulator.base_url, pipelines=tables)
        except (ConfigError, ValueError) as exc:
            assert key in str(exc), (key, str(exc))
        else:
            raise AssertionError(f"{key}: accepted")


async def test_files_dropped_in_a_pipelines_folder_come_back_with_every_steps_result(
    make_daemon, tmp_path, nc, prefix
) -> None:
    from tests.integration.test_folders import drop, lines, wait_for

    await make_daemon(batching=BATCHING, folders={"settle_s": 0.3}, handlers=HANDLERS, pipelines=triage())
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    emails = sorted((FIXTURES / "emails").glob("*.eml"))[:4]
    for path in emails:
        drop(path, inbox / "triage" / path.name)
    expected = [outbox / "triage" / f"{p.name}.results.jsonl" for p in emails]
    await wait_for(lambda: all(p.exists() for p in expected), "every results file", 60)
    for path in expected:
        [event] = lines(path)
        assert event["status"] == "ok" and event["handler"] == "triage", event
        assert {"extract", "classify"} <= set(event["result"]) and event["steps"][0]["route"] == "batch"
    assert sorted(p.name for p in (inbox / ".done").iterdir()) == sorted(p.name for p in emails)


async def test_status_shows_items_per_step_and_metrics_count_each_step(make_daemon, nc, prefix) -> None:
    import asyncio

    from service.cli.status import collect

    js = nc.jetstream()
    daemon = await make_daemon(batching=BATCHING, handlers=HANDLERS, pipelines=triage())
    items = sample_emails()
    await publish_items(js, f"{prefix}.in.triage", items)
    got = await final_events(js, daemon, prefix, len(items))
    ran = {
        h: sum(1 for e in got for s in e["steps"] if s["handler"] == h)
        for h in ("extract", "classify", "draft_reply")
    }
    skipped = sum(1 for e in got if e["skipped"])
    assert daemon.stats is not None
    for _ in range(100):
        await daemon.stats.save()
        status = await collect(daemon.settings)
        [row] = status["pipelines"]
        if row["finished"]["ok"] == len(items):
            break
        await asyncio.sleep(0.2)
    assert row["pipeline"] == "triage" and row["finished"] == {"ok": len(items), "error": 0}
    by_step = {s["handler"]: s for s in row["steps"]}
    assert {h: by_step[h]["ok"] for h in ran} == ran
    assert by_step["draft_reply"]["skipped"] == skipped
    # results today count the pipeline's items once each (not their steps)
    assert status["today"]["results"]["ok"] == len(items)
