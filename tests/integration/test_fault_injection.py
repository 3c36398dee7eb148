"""Holes found by fault injection (issue 10), each closed against the real nats-server and
the emulator: input Python cannot parse, a redelivery of a message still in flight (a
frozen process), items near the NATS message size, a provider blip, wildcard handler
subjects and lone surrogates."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
from collections import Counter
from pathlib import Path

import pytest

from devkit.process import DaemonProcess
from tests.conftest import TEST_KEY, events, read_stream
from tests.integration.test_crash import daemon_env

# Each case: (handler subject token, raw body, the code its error event must carry).
# Codes may repeat here; the first corpus (test_sync_path.BAD_ITEMS) has one per code.
FAULT_CORPUS: list[tuple[str, bytes, str]] = [
    # a 5,000-digit integer: Python's int() refuses it with a plain ValueError
    ("tags", b'{"id": "f-bigint", "text": "x", "metadata": {"n": ' + b"9" * 5000 + b"}}", "invalid_json"),
    ("tags", b'{"text": "x", "fields": {"n": "1"}, "priority": ' + b"1" * 4400 + b"}", "invalid_json"),
    # JSON, but not Unicode text: no provider can read a lone surrogate
    ("tags", b'{"id": "f-surrogate", "text": "half a pair \\ud800 here"}', "invalid_text"),
    ("tags", b'{"id": "f-surrogate-field", "text": "x", "fields": {"t": "\\udc00"}}', "invalid_fields"),
    # wildcard characters where a handler name goes: answered on <prefix>.out._invalid
    ("*", b'{"id": "f-star", "text": "x"}', "unknown_handler"),
    (">", b'{"id": "f-gt", "text": "x"}', "unknown_handler"),
    ("a.b", b'{"id": "f-dots", "text": "x"}', "unknown_handler"),
]


async def test_inputs_python_cannot_parse_each_get_their_coded_ending(make_daemon, nc, prefix) -> None:
    daemon = await make_daemon()
    js = nc.jetstream()
    for handler, raw, _ in FAULT_CORPUS:
        await js.publish(f"{prefix}.in.{handler}", raw)
    out_msgs = await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.>", len(FAULT_CORPUS))
    out = events(out_msgs)
    dlq = events(await read_stream(js, daemon.subjects.stream("DLQ"), f"{prefix}.dlq.>", len(FAULT_CORPUS)))
    assert sorted(e["error"]["code"] for e in out) == sorted(code for *_, code in FAULT_CORPUS)
    assert all(e["status"] == "error" and e["error"]["retryable"] is False for e in out)
    assert sorted(d["error"]["code"] for d in dlq) == sorted(code for *_, code in FAULT_CORPUS)
    # no event on a wildcard subject: the three odd handler names share one safe subject
    subjects = Counter(m.subject for m in out_msgs)
    assert subjects[f"{prefix}.out._invalid"] == 3, subjects
    assert {e["handler"] for e in out if e["id"] in ("f-star", "f-gt", "f-dots")} == {"*", ">", "a.b"}
    # and the daemon keeps serving
    reply = await nc.request(
        f"{prefix}.sync.sentiment", json.dumps({"id": "after", "text": "fine"}).encode(), timeout=10
    )
    assert json.loads(reply.data)["status"] == "ok"
    # a sync request with such a body gets its coded reply too, not silence
    raw = b'{"text": "x", "metadata": {"n": ' + b"9" * 5000 + b"}}"
    bad = json.loads((await nc.request(f"{prefix}.sync.tags", raw, timeout=10)).data)
    assert bad["error"]["code"] == "invalid_json"


async def test_max_deliveries_of_an_unparseable_message_still_ends_it(make_daemon, nc, prefix) -> None:
    # The max-deliveries path reads what it can of the message and must never raise: a
    # body holding an integer Python cannot convert used to escape it, leaving no ending.
    daemon = await make_daemon()
    await daemon._stop_intake()  # the message stays in the stream, as after max_deliver
    js = nc.jetstream()
    body = b'{"id": "md1", "text": "x", "metadata": {"n": ' + b"8" * 5000 + b"}}"
    ack = await js.publish(f"{prefix}.in.tags", body)
    advisory = {"stream": daemon.subjects.stream("IN"), "stream_seq": ack.seq, "deliveries": 10}
    await daemon._requests.on_max_deliveries(advisory)
    [event] = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 1))
    assert event["status"] == "error" and event["error"]["code"] == "max_deliveries"
    [entry] = events(await read_stream(js, daemon.subjects.stream("DLQ"), f"{prefix}.dlq.tags", 1))
    assert entry["id"] == event["id"] and entry["raw"].startswith('{"id": "md1"')
    # an advisory for a message that is gone is logged, never raised
    await daemon._requests.on_max_deliveries({"stream": daemon.subjects.stream("IN"), "stream_seq": 10**9})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_provider_blip_of_seconds_is_ridden_out_by_sync_retries(
    make_daemon, nc, prefix, tmp_path: Path
) -> None:
    # Issue 10, point 7: every urgent item sent during a short provider outage ended
    # `connection_error` after ~1.5 s of retries. Now they retry for a time budget.
    from service.emulator import Emulator, EmulatorConfig
    from service.settings import RetrySettings

    port = free_port()
    first = Emulator(EmulatorConfig(api_key=TEST_KEY, seed=1))
    base_url = await first.start(host="127.0.0.1", port=port)
    daemon = await make_daemon(
        openai={"base_url": base_url, "timeout_s": 2},
        retry=RetrySettings().model_dump(),  # the defaults, not the suite's fast ones
    )
    js = nc.jetstream()
    await first.stop()  # the provider vanishes
    for i in range(20):
        item = {"id": f"blip{i}", "text": f"urgent {i}", "priority": "urgent"}
        await js.publish(f"{prefix}.in.sentiment", json.dumps(item).encode())
    await asyncio.sleep(8)  # longer than the old retries lasted (5 calls, ~1.5-7 s)
    second = Emulator(EmulatorConfig(api_key=TEST_KEY, seed=1))
    await second.start(host="127.0.0.1", port=port)  # and comes back on the same address
    try:
        out = events(
            await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.sentiment", 20, timeout_s=60)
        )
    finally:
        await daemon.stop()
        await second.stop()
    assert len(out) == 20 and all(e["status"] == "ok" for e in out), Counter(
        (e["status"], (e["error"] or {}).get("code")) for e in out
    )
    assert all(e["attempts"] > 1 for e in out)


async def test_normal_items_near_the_size_limit_are_buffered_and_spare_their_neighbours(
    make_daemon, nc, prefix
) -> None:
    # Issue 10, point 4: a buffer record held the text twice (item + request body), so a
    # normal item above ~512 KB could never be buffered and its NAKed fetch took its
    # neighbours down with it. Now every accepted item fits every message written for it.
    # (A model with a context of a million tokens, as gpt-4.1's, can read such an item.)
    from service.emulator import Emulator, EmulatorConfig

    emu = Emulator(EmulatorConfig(api_key=TEST_KEY, seed=1, batch_delay_s=0.5, context_window=1_047_576))
    await emu.start(host="127.0.0.1", port=0)
    daemon = await make_daemon(
        openai={"base_url": emu.base_url},
        batching={"max_wait_s": 1, "poll_interval_s": 0.3},
        handlers={"longread": {"model": "gpt-4.1-mini", "prompt": "Summarise:\n\n{text}", "output": "text"}},
    )
    js = nc.jetstream()
    limit = daemon.pipeline.config.max_item_bytes
    assert limit <= nc.max_payload - 16 * 1024  # bounded by the server's max_payload
    big_text = "word " * ((limit - 400) // 5)
    items: list[bytes] = []
    for i in range(12):
        items.append(json.dumps({"id": f"small{i}", "text": f"small item {i}"}).encode())
        if i % 4 == 0:
            items.append(json.dumps({"id": f"big{i}", "text": big_text}).encode())
    assert all(len(raw) <= limit for raw in items) and max(len(raw) for raw in items) > 700_000
    futures = [await js.publish_async(f"{prefix}.in.longread", raw) for raw in items]
    await asyncio.gather(*futures)
    out = events(
        await read_stream(
            js, daemon.subjects.stream("OUT"), f"{prefix}.out.longread", len(items), timeout_s=60
        )
    )
    assert Counter(e["status"] for e in out) == {"ok": len(items)}, [e["error"] for e in out if e["error"]]
    assert {e["route"] for e in out} == {"batch"}
    # over the limit: a coded bad item whose DLQ entry still fits a NATS message
    too_big = json.dumps({"id": "huge", "text": "z" * (limit + 10)}).encode()
    assert len(too_big) < nc.max_payload
    await js.publish(f"{prefix}.in.longread", too_big)
    try:
        [event] = events(
            await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.longread", len(items) + 1)
        )[-1:]
        [entry] = events(await read_stream(js, daemon.subjects.stream("DLQ"), f"{prefix}.dlq.longread", 1))
    finally:
        await daemon.stop()
        await emu.stop()
    assert event["id"] == "huge" and event["error"]["code"] == "item_too_large"
    assert entry["id"] == "huge" and entry["truncated"]["field"] == "raw"


@pytest.mark.slow
@pytest.mark.timeout(180)
async def test_a_frozen_daemon_answers_each_redelivered_message_once(nats_url, nc, prefix, tmp_path) -> None:
    # Issue 10, point 3: SIGSTOP the daemon past ack_wait while 200 urgent calls are in
    # flight; JetStream redelivers them meanwhile. Each intake message gets one event.
    from service.emulator import Emulator, EmulatorConfig, FaultConfig

    emu = Emulator(EmulatorConfig(api_key=TEST_KEY, seed=2))
    await emu.start(host="127.0.0.1", port=0)
    emu.set_faults(FaultConfig(latency_s=6.0))  # the calls outlast the freeze
    env = daemon_env(tmp_path, nats_url, prefix, emu.base_url)
    env.update({"ENRICHD_OPENAI__TIMEOUT_S": "30", "ENRICHD_OPENAI__MAX_CONCURRENCY": "256"})
    daemon = DaemonProcess(env, tmp_path / "daemon.log").start()
    js = nc.jetstream()
    try:
        futures = [
            await js.publish_async(
                f"{prefix}.in.sentiment",
                json.dumps({"id": f"z{i:03d}", "text": f"frozen {i}", "priority": "urgent"}).encode(),
            )
            for i in range(200)
        ]
        await asyncio.gather(*futures)
        await asyncio.sleep(1.0)  # calls in flight
        assert daemon.proc is not None
        os.kill(daemon.proc.pid, signal.SIGSTOP)
        await asyncio.sleep(4.5)  # ack_wait is 3 s: JetStream redelivers every unacked message
        os.kill(daemon.proc.pid, signal.SIGCONT)
        stream = daemon_stream(prefix, "OUT")
        await read_stream(js, stream, f"{prefix}.out.sentiment", 200, timeout_s=60)
        await asyncio.sleep(8)  # room for a second answer to show up
        msgs = await read_stream(js, stream, f"{prefix}.out.sentiment", 400, timeout_s=3)
    finally:
        code = daemon.terminate()
        await emu.stop()
    got = events(msgs)
    seqs = Counter(m.headers.get("Enrichd-Intake-Seq") for m in msgs if m.headers)
    ids = Counter(e["id"] for e in got)
    assert len(ids) == 200, daemon.log_tail()
    assert set(ids.values()) == {1}, f"answered twice: {[i for i, n in ids.items() if n > 1][:10]}"
    assert all(n == 1 for n in seqs.values())
    assert all(e["status"] == "ok" for e in got)
    log = daemon.log_tail(100000)
    assert "redelivered while in flight" in log
    assert "received=200 " in log  # the copies were never processed again
    assert code == 0


def daemon_stream(prefix: str, kind: str) -> str:
    return f"{prefix.upper()}_{kind}"
