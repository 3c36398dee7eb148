"""Handler versions (CONTRACT §13, issue 12 must-show 1): a changed prompt answers the same
ids afresh, with the new ``handler_version``, on the sync and the batch route; asked
again under the new version they are ``cached: true``; a re-submission under an unchanged
version stays cached. The fresh answer of an id already answered under the old version
reaches the consumer of ``enrich.out.<handler>`` even inside JetStream's duplicate
window (the sink resends it as ``<id>:<handler>:dup:<intake seq>``)."""

from __future__ import annotations

import asyncio
import json
import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from devkit.nats import closed_port
from service.core.estimates import MIN_OBSERVED
from tests.conftest import events, publish_items, read_stream
from tests.integration.test_operations import cli_env, enrichd

BATCHING = {"max_wait_s": 0.3, "poll_interval_s": 0.2}
URGENT = [
    {"id": f"ver-u{i}", "text": f"urgent note {i} about invoices", "priority": "urgent"} for i in range(3)
]
NORMAL = [{"id": f"ver-n{i}", "text": f"normal note {i} about travel"} for i in range(3)]
IDS = sorted(item["id"] for item in URGENT + NORMAL)


async def out_messages(js: Any, daemon: Any, prefix: str, count: int) -> list[Any]:
    msgs = await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", count, timeout_s=40)
    assert len(msgs) == count, [json.loads(m.data)["id"] for m in msgs]
    return msgs


def by_route(evs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["id"]: e["route"] for e in evs}


async def test_a_changed_prompt_answers_afresh_then_cached_under_the_new_version(
    make_daemon, nc, prefix, emulator
) -> None:
    js = nc.jetstream()
    first = await make_daemon(batching=BATCHING)
    v1 = first.settings.registry["tags"].version
    await publish_items(js, f"{prefix}.in.tags", [*URGENT, *NORMAL])
    round1 = events(await out_messages(js, first, prefix, 6))
    assert sorted(e["id"] for e in round1) == IDS
    assert all(e["status"] == "ok" and not e["cached"] and e["handler_version"] == v1 for e in round1)
    assert by_route(round1) == {**{i["id"]: "sync" for i in URGENT}, **{i["id"]: "batch" for i in NORMAL}}

    # the same version again: answered from the store, no provider call
    calls = emulator.stats
    await publish_items(js, f"{prefix}.in.tags", [*URGENT, *NORMAL])
    round2 = events(await out_messages(js, first, prefix, 12))[6:]
    assert sorted(e["id"] for e in round2) == IDS
    assert all(e["cached"] and e["handler_version"] == v1 and e["cost_usd"] == 0 for e in round2)
    after = emulator.stats
    assert after["chat_requests_ok"] == calls["chat_requests_ok"]
    assert after["batch_lines_total"] == calls["batch_lines_total"]
    await first.stop()

    # a changed prompt: a new version, the same ids answered afresh (provider calls seen)
    second = await make_daemon(
        batching=BATCHING, handlers={"tags": {"prompt": "Give the topics of this note as tags:\n\n{text}"}}
    )
    v2 = second.settings.registry["tags"].version
    assert v2 != v1 and len(v2) == 12
    before = emulator.stats
    await publish_items(js, f"{prefix}.in.tags", [*URGENT, *NORMAL])
    msgs = (await out_messages(js, second, prefix, 18))[12:]
    round3 = events(msgs)
    assert sorted(e["id"] for e in round3) == IDS
    assert all(e["status"] == "ok" and not e["cached"] and e["handler_version"] == v2 for e in round3)
    assert by_route(round3) == by_route(round1)
    after = emulator.stats
    assert after["chat_requests_ok"] - before["chat_requests_ok"] >= len(URGENT)
    assert after["batch_lines_total"] - before["batch_lines_total"] == len(NORMAL)
    # within JetStream's duplicate window, `<id>:tags` was taken by the first answer: the
    # consumer still got the fresh one, under a `:dup:<intake seq>` id
    for msg in msgs:
        event = json.loads(msg.data)
        seq = msg.headers["Enrichd-Intake-Seq"]
        assert msg.headers["Nats-Msg-Id"] == f"{event['id']}:tags:dup:{seq}", msg.headers

    # the new version again: cached, with that version
    calls = emulator.stats
    await publish_items(js, f"{prefix}.in.tags", [*URGENT, *NORMAL])
    round4 = events(await out_messages(js, second, prefix, 24))[18:]
    assert sorted(e["id"] for e in round4) == IDS
    assert all(e["cached"] and e["handler_version"] == v2 for e in round4)
    assert emulator.stats["chat_requests_ok"] == calls["chat_requests_ok"]
    assert emulator.stats["batch_lines_total"] == calls["batch_lines_total"]
    # exactly one event per intake message: nothing else arrived
    extra = await read_stream(js, second.subjects.stream("OUT"), f"{prefix}.out.tags", 25, timeout_s=1.5)
    assert len(extra) == 24


async def wait_status(env: dict[str, str], predicate: Any, timeout_s: float = 30) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        done = await enrichd("status", "--json", env=env)
        data = json.loads(done.stdout) if done.returncode == 0 else {}
        if data and predicate(data):
            return data
        assert loop.time() < deadline, (done.stdout, done.stderr)
        await asyncio.sleep(0.5)


def tags_row(status: dict[str, Any]) -> dict[str, Any]:
    return next(r for r in status["handlers"] if r["handler"] == "tags")


async def test_versions_status_and_estimate_read_what_the_daemon_observed(
    make_daemon, nc, prefix, emulator, nats_url, tmp_path
) -> None:
    js = nc.jetstream()
    daemon = await make_daemon(batching=BATCHING)
    v1 = daemon.settings.registry["tags"].version
    await publish_items(js, f"{prefix}.in.tags", [*URGENT, *NORMAL])
    paid = events(await out_messages(js, daemon, prefix, 6))
    env = cli_env(tmp_path, nats_url, prefix)

    # status: today's paid results per handler, with the estimate against billed
    status = await wait_status(env, lambda d: tags_row(d)["today"]["items"] == 6)
    row = tags_row(status)
    today = row["today"]
    assert row["handler_version"] == v1 and row["model"] == "gpt-4o-mini" and row["pack"] == 1
    assert today["routes"] == {"sync": 3, "batch": 3} and today["versions"] == {v1: 6}
    assert today["output_tokens"] == sum(e["usage"]["output_tokens"] for e in paid)
    assert today["billed_usd"] == pytest.approx(sum(e["cost_usd"] for e in paid), abs=1e-6)
    # before MIN_OBSERVED results had been seen the estimate said max_output_tokens, after
    # them the observed average
    ceiling = daemon.settings.registry["tags"].max_output_tokens
    assert MIN_OBSERVED * ceiling < today["estimated_output_tokens"] < 6 * ceiling
    assert today["estimated_usd"] > today["billed_usd"] and today["estimate_over_billed"] > 1
    assert status["today"]["estimate"]["items"] == 6
    text = (await enrichd("status", env=env)).stdout
    assert "estimate vs billed today" in text and v1 in text and "handlers" in text

    # estimate: the observed output per item of this handler version replaces the bound
    items = tmp_path / "items.jsonl"
    soon = (datetime.now(UTC) + timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    lines = [
        {"id": "e1", "text": "an urgent one", "priority": "urgent"},
        {"id": "e2", "text": "one with a deadline", "deadline": soon},
        {"id": "e3", "text": "a normal one"},
        {"id": "e4", "text": "another normal one"},
    ]
    items.write_text("".join(json.dumps(line) + "\n" for line in lines))
    done = await enrichd("estimate", "tags", str(items), "--json", env=env)
    assert done.returncode == 0, done.stderr
    est = json.loads(done.stdout)
    assert est["output_basis"] == "version" and est["observed_items"] == 6
    assert est["output_per_item"] == pytest.approx(today["output_tokens"] / 6, abs=0.01)
    assert est["output_tokens"] == round(est["output_per_item"] * 4)
    assert est["max_output_tokens"] == 4 * ceiling and est["handler_version"] == v1
    assert {r: m["items"] for r, m in est["mix"].items()} == {"sync": 2, "flex": 0, "batch": 2}
    assert est["mix_usd"] == pytest.approx(est["mix"]["sync"]["usd"] + est["mix"]["batch"]["usd"])
    assert est["sync_usd"] < est["max_sync_usd"] and "read from NATS" in est["stats"]
    text = (await enrichd("estimate", "tags", str(items), env=env)).stdout
    assert "route mix:      sync 2 / flex 0 / batch 2" in text
    assert "observed" in text and "results of this handler version" in text
    offline = json.loads(
        (await enrichd("estimate", "tags", str(items), "--json", "--offline", env=env)).stdout
    )
    assert offline["output_basis"] == "max_output_tokens" and offline["stats"] == "not read (--offline)"

    # versions: the configured ones, and the versions of the stored answers
    listed = json.loads((await enrichd("versions", "--json", env=env)).stdout)
    tags = next(r for r in listed["handlers"] if r["handler"] == "tags")
    assert tags["handler_version"] == v1 and tags["stored"] == {"keys": 6, "read": 6, "versions": {v1: 6}}
    assert listed["store"]["read"] and "read 6 of 6" in listed["store"]["note"]
    text = (await enrichd("versions", env=env)).stdout
    assert f"{v1} (current): 6" in text and "summarize" in text
    await daemon.stop()

    # a changed prompt: three ids answered afresh, under the new version
    prompt = "Give the topics of this note as tags:\n\n{text}"
    second = await make_daemon(batching=BATCHING, handlers={"tags": {"prompt": prompt}})
    v2 = second.settings.registry["tags"].version
    await publish_items(js, f"{prefix}.in.tags", URGENT)
    await out_messages(js, second, prefix, 9)
    env["ENRICHD_HANDLERS__TAGS__PROMPT"] = prompt  # the command line sees the new definition
    listed = json.loads((await enrichd("versions", "--json", env=env)).stdout)
    tags = next(r for r in listed["handlers"] if r["handler"] == "tags")
    assert tags["handler_version"] == v2 and tags["stored"]["versions"] == {v1: 3, v2: 3}
    text = (await enrichd("versions", env=env)).stdout
    assert f"{v2} (current): 3" in text and f"{v1}: 3" in text
    sampled = json.loads((await enrichd("versions", "--json", "--limit", "4", env=env)).stdout)
    tags = next(r for r in sampled["handlers"] if r["handler"] == "tags")
    assert tags["stored"]["keys"] == 6 and tags["stored"]["read"] == 4
    assert (
        sum(tags["stored"]["versions"].values()) == 4 and "at most 4 per handler" in sampled["store"]["note"]
    )
    # status: today's results by version; the new version started from the handler's
    # earlier observations (6 results of v1), not from the bound
    status = await wait_status(env, lambda d: tags_row(d)["today"]["items"] == 9)
    today = tags_row(status)["today"]
    assert tags_row(status)["handler_version"] == v2 and today["versions"] == {v1: 6, v2: 3}
    assert today["estimated_output_tokens"] < 9 * ceiling


async def test_versions_and_estimate_without_nats(tmp_path: Path, prefix: str) -> None:
    env = cli_env(tmp_path, f"nats://enrichd:secret-pw@127.0.0.1:{closed_port()}", prefix)
    started = time.monotonic()
    done = await enrichd("versions", env=env)
    assert time.monotonic() - started < 8
    assert done.returncode == 0, done.stderr
    assert "tags" in done.stdout and "summarize" in done.stdout
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("enrichd: result store not read: cannot reach NATS at")
    assert "secret-pw" not in done.stdout + done.stderr
    offline = await enrichd("versions", "--offline", "--json", env=env)
    data = json.loads(offline.stdout)
    assert not data["store"]["read"] and all(r["stored"] is None for r in data["handlers"])
    note = tmp_path / "n.txt"
    note.write_text("a note")
    est = json.loads((await enrichd("estimate", "tags", str(note), "--json", env=env)).stdout)
    assert est["output_basis"] == "max_output_tokens" and est["stats"].startswith(
        "stats not read: cannot reach"
    )


async def test_estimate_route_mix_with_flex_and_packing(tmp_path: Path) -> None:
    text = (
        '[openai]\nbase_url = "http://127.0.0.1:9/v1"\napi_key = "sk-unused-0000"\n'
        "[routing]\nflex = true\n"
        '[handlers.tags]\nmodel = "gpt-5-mini"\npack = 4\n'
        'system = "You tag notes with a few short lowercase topic words, most specific first."\n'
    )
    config, single = tmp_path / "flex.toml", tmp_path / "single.toml"
    config.write_text(text)
    single.write_text(text.replace("pack = 4", "pack = 1"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENRICHD_", "OPENAI_"))}
    soon = (datetime.now(UTC) + timedelta(hours=2)).isoformat().replace("+00:00", "Z")
    later = (datetime.now(UTC) + timedelta(days=3)).isoformat().replace("+00:00", "Z")
    items = tmp_path / "mix.jsonl"
    lines = [{"text": f"urgent {i}", "priority": "urgent"} for i in range(2)]
    lines += [{"text": f"deadline {i}", "deadline": soon} for i in range(3)]
    lines += [{"text": f"later {i}", "deadline": later} for i in range(5)]
    items.write_text("".join(json.dumps(line) + "\n" for line in lines))
    args = ("estimate", "tags", str(items), "--offline", "--config", str(config))
    est = json.loads((await enrichd(*args, "--json", env=env)).stdout)
    assert {r: m["items"] for r, m in est["mix"].items()} == {"sync": 2, "flex": 3, "batch": 5}
    assert est["pack"] == 4 and est["output_basis"] == "max_output_tokens"
    unpacked = json.loads((await enrichd(*args[:-1], str(single), "--json", env=env)).stdout)
    assert est["input_tokens"] < unpacked["input_tokens"]  # packs carry the system prompt once
    flex, batch = est["mix"]["flex"], est["mix"]["batch"]
    # flex and batch at the batch discount: the same price per token
    assert flex["usd"] / (flex["input_tokens"] * 0.25 + flex["output_tokens"] * 2.0) == pytest.approx(
        batch["usd"] / (batch["input_tokens"] * 0.25 + batch["output_tokens"] * 2.0)
    )
    assert est["mix_usd"] == pytest.approx(sum(m["usd"] for m in est["mix"].values()))
    urgent = json.loads((await enrichd(*args, "--json", "--priority", "urgent", env=env)).stdout)
    assert urgent["mix"]["sync"]["items"] == 10 and urgent["mix_usd"] == pytest.approx(urgent["sync_usd"])
