"""The daemon end to end on a real nats-server, with the emulator over real HTTP:
sync intake, request/reply, bad items, provider faults, TOML handlers, secrets."""

from __future__ import annotations

import asyncio
import io
import json
import logging

import pytest

from tests.conftest import FIXTURES, TEST_KEY, events, publish_items, read_stream


async def test_high_priority_tags_item_gets_ok_event(make_daemon, nc, prefix, emulator) -> None:
    daemon = await make_daemon()
    js = nc.jetstream()
    email = (FIXTURES / "emails" / "gmail.eml").read_text(errors="replace")
    await publish_items(
        js,
        f"{prefix}.in.tags",
        [
            {
                "id": "mail-1",
                "text": email,
                "priority": "high",
                "metadata": {"mailbox": "ops"},
                "source": "email",
            }
        ],
    )
    msgs = await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 1)
    assert len(msgs) == 1
    assert msgs[0].headers["Nats-Msg-Id"] == "mail-1:tags"
    event = json.loads(msgs[0].data)
    assert event["status"] == "ok" and event["route"] == "sync" and event["error"] is None
    assert isinstance(event["result"]["tags"], list) and event["result"]["tags"]
    assert event["model"] == "gpt-4o-mini" and event["attempts"] == 1 and event["cached"] is False
    assert event["usage"]["input_tokens"] > 0 and event["cost_usd"] > 0
    assert event["metadata"] == {"mailbox": "ops"} and event["source"] == "email"
    assert event["batch_id"] is None
    assert event["received_at"].endswith("Z") and event["completed_at"] >= event["received_at"]
    # the intake ack follows the result's PubAck: give it a moment to reach the server
    for _ in range(100):
        info = await js.consumer_info(daemon.subjects.stream("IN"), daemon.settings.nats.consumer)
        if info.num_ack_pending == 0:
            break
        await asyncio.sleep(0.05)
    assert info.num_ack_pending == 0 and info.num_pending == 0


async def test_sync_request_reply(make_daemon, nc, prefix) -> None:
    await make_daemon()
    reply = await nc.request(
        f"{prefix}.sync.classify",
        json.dumps({"id": "q1", "text": "Your invoice is overdue"}).encode(),
        timeout=10,
    )
    event = json.loads(reply.data)
    assert event["id"] == "q1" and event["status"] == "ok" and event["route"] == "sync"
    assert event["result"]["label"] in {
        "billing",
        "support",
        "sales",
        "personal",
        "newsletter",
        "notification",
        "spam",
        "other",
    }
    bad = json.loads((await nc.request(f"{prefix}.sync.nosuch", b'{"text": "x"}', timeout=10)).data)
    assert bad["status"] == "error" and bad["error"]["code"] == "unknown_handler"


BAD_ITEMS: list[tuple[str, bytes, str]] = [
    ("tags", b"\xff\xfe\xfd not utf-8", "invalid_utf8"),
    ("tags", b"{this is not json", "invalid_json"),
    ("tags", b"[1, 2, 3]", "not_an_object"),
    ("tags", b'{"id": "b-missing"}', "missing_text"),
    ("tags", b'{"id": "b-int", "text": 12}', "invalid_text"),
    ("tags", b'{"id": "b-empty", "text": "  "}', "empty_text"),
    ("tags", b'{"id": "b-fields", "text": "x", "fields": {"n": 1}}', "invalid_fields"),
    ("tags", b'{"id": "bad id with spaces", "text": "x"}', "invalid_id"),
    ("tags", b'{"id": "b-prio", "text": "x", "priority": "asap"}', "invalid_priority"),
    ("tags", b'{"id": "b-dl", "text": "x", "deadline": "next week"}', "invalid_deadline"),
    ("tags", b'{"id": "b-meta", "text": "x", "metadata": [1]}', "invalid_metadata"),
    ("tags", b'{"id": "b-src", "text": "x", "source": {"a": 1}}', "invalid_source"),
    ("tags", b'{"id": "b-unknown", "text": "x", "colour": "red"}', "unknown_field"),
    ("nosuchhandler", b'{"id": "b-handler", "text": "x"}', "unknown_handler"),
    ("tags", json.dumps({"id": "b-big", "text": "x" * 5000}).encode(), "item_too_large"),
    ("gist", b'{"id": "b-template", "text": "note without title"}', "missing_template_field"),
]


async def test_bad_item_corpus_each_gets_error_event_and_dlq(make_daemon, nc, prefix) -> None:
    daemon = await make_daemon(
        limits={"max_item_bytes": 4096},
        handlers={"gist": {"prompt": "Summarise {title}: {text}", "output": "text"}},
    )
    js = nc.jetstream()
    for handler, raw, _ in BAD_ITEMS:
        await js.publish(f"{prefix}.in.{handler}", raw)
    out = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.>", len(BAD_ITEMS)))
    dlq = events(await read_stream(js, daemon.subjects.stream("DLQ"), f"{prefix}.dlq.>", len(BAD_ITEMS)))
    expected = sorted(code for _, _, code in BAD_ITEMS)
    assert len(set(expected)) == len(BAD_ITEMS) >= 15
    assert sorted(e["error"]["code"] for e in out) == expected
    assert all(
        e["status"] == "error" and e["result"] is None and e["error"]["retryable"] is False for e in out
    )
    assert sorted(d["error"]["code"] for d in dlq) == expected
    by_code = {d["error"]["code"]: d for d in dlq}
    assert by_code["invalid_utf8"]["item"] is None and "not utf-8" in by_code["invalid_utf8"]["raw"]
    assert by_code["missing_template_field"]["item"]["id"] == "b-template"
    assert {e["id"] for e in out if e["error"]["code"] == "invalid_text"} == {"b-int"}
    # the daemon keeps serving good items
    await js.publish(
        f"{prefix}.in.sentiment", json.dumps({"id": "good", "text": "great!", "priority": "urgent"}).encode()
    )
    good = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.sentiment", 1))
    assert good[0]["id"] == "good" and good[0]["status"] == "ok"


async def test_transient_faults_are_retried_and_urgent_items_succeed(
    make_daemon, nc, prefix, emulator
) -> None:
    from service.emulator import FaultConfig

    daemon = await make_daemon()
    emulator.set_faults(FaultConfig(script=[429, 500, 429, 503, 500], retry_after_s=0.1))
    js = nc.jetstream()
    items = [{"id": f"u{i}", "text": f"urgent item number {i}", "priority": "urgent"} for i in range(4)]
    await publish_items(js, f"{prefix}.in.summarize", items)
    out = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.summarize", 4))
    assert sorted(e["id"] for e in out) == ["u0", "u1", "u2", "u3"]
    assert all(e["status"] == "ok" for e in out)
    assert sum(e["attempts"] for e in out) == 4 + 5
    assert emulator.stats["status_counts"].get("429", emulator.stats["status_counts"].get(429)) == 2


async def test_permanent_errors_are_not_retried(make_daemon, nc, prefix, emulator) -> None:
    daemon = await make_daemon()
    js = nc.jetstream()
    await publish_items(
        js,
        f"{prefix}.in.tags",
        [
            {"id": "p400", "text": "please fail [[emulator:status=400]]", "priority": "urgent"},
            {"id": "p404", "text": "no model [[emulator:status=404]]", "priority": "urgent"},
        ],
    )
    out = {
        e["id"]: e
        for e in events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 2))
    }
    assert out["p400"]["error"]["code"] == "bad_request" and out["p400"]["attempts"] == 1
    assert out["p404"]["error"]["code"] == "not_found" and out["p404"]["attempts"] == 1
    dlq = {
        e["item"]["id"]: e
        for e in events(await read_stream(js, daemon.subjects.stream("DLQ"), f"{prefix}.dlq.tags", 2))
    }
    assert dlq["p400"]["error"]["code"] == "bad_request" and dlq["p400"]["attempts"] == 1
    assert dlq["p400"]["last_provider_message"]


async def test_wrong_api_key_is_auth_failed_not_retried_and_never_leaks(
    make_daemon, nc, prefix, emulator, tmp_path
) -> None:
    from service.observability import logs

    wrong_key = "sk-wrong-9d8c7b6a5f4e3d2c1b0a99887766554433"
    captured = io.StringIO()
    logs.configure(level="DEBUG", fmt="json", secrets=[wrong_key, TEST_KEY], stream=captured)
    try:
        daemon = await make_daemon(api_key=wrong_key)
        logging.getLogger("enrichd.test").info("the key is %s", wrong_key)
        js = nc.jetstream()
        await publish_items(js, f"{prefix}.in.tags", [{"id": "k1", "text": "hello", "priority": "urgent"}])
        out = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 1))
        dlq = await read_stream(js, daemon.subjects.stream("DLQ"), f"{prefix}.dlq.tags", 1)
    finally:
        logging.getLogger().handlers.clear()
    assert out[0]["error"]["code"] == "auth_failed" and out[0]["attempts"] == 1
    everything = captured.getvalue() + json.dumps(out) + dlq[0].data.decode()
    assert "auth_failed" in everything
    assert wrong_key not in everything and TEST_KEY not in everything
    assert "***" in captured.getvalue()


async def test_invalid_output_is_retried_once_then_dead_lettered(make_daemon, nc, prefix, emulator) -> None:
    daemon = await make_daemon()
    js = nc.jetstream()
    before = emulator.stats.get("chat_requests_ok", 0)
    await publish_items(
        js,
        f"{prefix}.in.sentiment",
        [{"id": "inv", "text": "garbage please [[emulator:invalid_json]]", "priority": "urgent"}],
    )
    out = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.sentiment", 1))
    assert out[0]["error"]["code"] == "invalid_output" and out[0]["attempts"] == 2
    assert emulator.stats.get("chat_requests_ok", 0) - before == 2
    assert out[0]["usage"]["input_tokens"] > 0  # both calls are paid for and reported
    dlq = events(await read_stream(js, daemon.subjects.stream("DLQ"), f"{prefix}.dlq.sentiment", 1))
    assert dlq[0]["error"]["code"] == "invalid_output"


async def test_toml_text_handler_end_to_end(make_daemon, nc, prefix) -> None:
    daemon = await make_daemon(
        handlers={
            "gist": {
                "model": "gpt-4o-mini",
                "system": "You summarise notes in one sentence.",
                "prompt": "Summarise this note titled {title}:\n\n{text}",
                "output": "text",
                "max_output_tokens": 200,
            }
        }
    )
    js = nc.jetstream()
    note = (FIXTURES / "notes" / "References" / "Kyoto.md").read_text()
    await publish_items(
        js,
        f"{prefix}.in.gist",
        [{"id": "note-1", "text": note, "fields": {"title": "Kyoto"}, "priority": "urgent"}],
    )
    out = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.gist", 1))
    assert out[0]["status"] == "ok" and isinstance(out[0]["result"], str) and out[0]["result"]


async def test_embed_handler(make_daemon, nc, prefix) -> None:
    await make_daemon()
    reply = await nc.request(f"{prefix}.sync.embed", b'{"text": "vectors please"}', timeout=10)
    event = json.loads(reply.data)
    assert event["status"] == "ok"
    assert event["result"]["dimensions"] == len(event["result"]["embedding"]) > 0
    assert event["usage"]["output_tokens"] == 0


async def test_normal_items_are_buffered_durably_not_dropped(make_daemon, nc, prefix, emulator) -> None:
    daemon = await make_daemon(batching={"max_wait_s": 3600})
    js = nc.jetstream()
    await publish_items(js, f"{prefix}.in.tags", [{"id": f"n{i}", "text": f"normal {i}"} for i in range(5)])
    stream = daemon.subjects.stream("BUFFER")
    for _ in range(100):
        info = await js.stream_info(stream, subjects_filter=f"{prefix}._buffer.>")
        if info.state.messages == 5:
            break
        await asyncio.sleep(0.05)
    assert info.state.messages == 5
    subject = next(iter(info.state.subjects))
    first = json.loads((await js.get_msg(stream, seq=info.state.first_seq, next=True, subject=subject)).data)
    assert first["item"]["id"] == "n0" and first["model"] == "gpt-4o-mini" and first["intake_seq"]
    assert "body" not in first  # the flush builds the request: the record holds the text once
    info = await js.consumer_info(daemon.subjects.stream("IN"), daemon.settings.nats.consumer)
    assert info.num_ack_pending == 0
    assert emulator.stats.get("chat_requests_ok", 0) == 0


async def test_resubmitted_id_is_answered_from_store(make_daemon, nc, prefix, emulator) -> None:
    daemon = await make_daemon()
    js = nc.jetstream()
    item = {"id": "again", "text": "answer me once", "priority": "urgent"}
    await publish_items(js, f"{prefix}.in.tags", [item])
    first = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 1))
    calls = emulator.stats.get("chat_requests_ok", 0)
    await publish_items(js, f"{prefix}.in.tags", [item])
    both = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 2))
    assert first[0]["cached"] is False
    assert both[1]["cached"] is True and both[1]["result"] == first[0]["result"] and both[1]["cost_usd"] == 0
    assert emulator.stats.get("chat_requests_ok", 0) == calls


async def test_forty_high_priority_items_all_answered_once(make_daemon, nc, prefix, emulator) -> None:
    from service.emulator import FaultConfig

    daemon = await make_daemon()
    emulator.set_faults(FaultConfig(latency_s=0.05))
    js = nc.jetstream()
    await publish_items(
        js, f"{prefix}.in.tags", [{"text": f"item {i}", "priority": "high"} for i in range(40)]
    )
    out = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 40))
    assert len(out) == 40 and len({e["id"] for e in out}) == 40
    assert all(e["status"] == "ok" for e in out)


@pytest.mark.parametrize("stream_kind", ["IN", "OUT", "DLQ", "EVENTS", "BUFFER"])
async def test_streams_are_created_idempotently(make_daemon, nc, prefix, stream_kind) -> None:
    daemon = await make_daemon()
    js = nc.jetstream()
    await js.publish(f"{prefix}.events.alert", b'{"keep": "me"}') if stream_kind == "EVENTS" else None
    await daemon.stop()
    await make_daemon()
    info = await js.stream_info(daemon.subjects.stream(stream_kind))
    assert info.config.name == daemon.subjects.stream(stream_kind)
    if stream_kind == "EVENTS":
        assert info.state.messages == 1


async def test_copies_of_one_urgent_item_at_once_make_one_provider_call(
    make_daemon, nc, prefix, emulator
) -> None:
    from service.emulator import FaultConfig

    emulator.set_faults(FaultConfig(latency_s=0.5))
    daemon = await make_daemon()
    js = nc.jetstream()
    item = json.dumps({"id": "twin", "text": "one answer for both", "priority": "urgent"}).encode()
    for _ in range(3):
        await js.publish(f"{prefix}.in.tags", item)
    got = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 3))
    assert [e["id"] for e in got] == ["twin"] * 3 and all(e["status"] == "ok" for e in got)
    assert sorted(e["cached"] for e in got) == [False, True, True]
    assert emulator.stats["chat_requests_ok"] == 1
