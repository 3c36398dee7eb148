"""The batch path against the emulator's Batch API: flushing, mapping, failure
scenarios, result caching."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import pytest

from tests.conftest import events, read_stream

FAST = {"max_wait_s": 0.5, "poll_interval_s": 0.2}


async def publish_many(js: Any, subject: str, items: list[dict[str, Any]]) -> None:
    futures = [await js.publish_async(subject, json.dumps(item).encode()) for item in items]
    await asyncio.gather(*futures)


def batch_events(msgs: list[Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for e in events(msgs):
        assert e["id"] not in out, f"duplicate result for {e['id']}"
        out[e["id"]] = e
    return out


@pytest.mark.slow
async def test_ten_thousand_items_make_five_batches(make_daemon, nc, prefix, emulator) -> None:
    daemon = await make_daemon(batching={"max_items": 2000, "max_wait_s": 3600, "poll_interval_s": 0.3})
    js = nc.jetstream(publish_async_max_pending=4000)
    items = [{"id": f"n{i:05d}", "text": f"note number {i} about topic {i % 17}"} for i in range(10_000)]
    await publish_many(js, f"{prefix}.in.tags", items)
    msgs = await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 10_000, timeout_s=120)
    out = batch_events(msgs)
    assert len(out) == 10_000
    assert all(e["status"] == "ok" and e["route"] == "batch" and e["batch_id"] for e in out.values())
    assert len({e["batch_id"] for e in out.values()}) == 5
    assert emulator.stats["batches_created"] == 5
    assert all(e["cost_usd"] > 0 for e in out.values())
    sent = Counter(emulator.stats["custom_ids_submitted"])
    assert len(sent) == 10_000 and set(sent.values()) == {1}
    completed = events(
        await read_stream(js, daemon.subjects.stream("EVENTS"), f"{prefix}.events.batch.completed", 5)
    )
    assert sorted(e["ok"] for e in completed) == [2000] * 5


async def test_results_map_back_whatever_the_order(make_daemon, nc, prefix, emulator) -> None:
    daemon = await make_daemon(batching=FAST)
    js = nc.jetstream()
    items = [{"id": f"m{i}", "text": f"message {i}", "metadata": {"n": i}} for i in range(50)]
    await publish_many(js, f"{prefix}.in.sentiment", items)
    out = batch_events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.sentiment", 50))
    assert len(out) == 50
    for i in range(50):
        assert out[f"m{i}"]["metadata"] == {"n": i}
        assert out[f"m{i}"]["result"]["sentiment"] in {"positive", "neutral", "negative", "mixed"}
    submitted = events(
        await read_stream(js, daemon.subjects.stream("EVENTS"), f"{prefix}.events.batch.submitted", 1)
    )
    assert submitted[0]["items"] == 50


async def test_per_line_errors_retry_or_dead_letter(make_daemon, nc, prefix, emulator) -> None:
    daemon = await make_daemon(batching=FAST)
    js = nc.jetstream()
    items = [{"id": f"ok{i}", "text": f"fine {i}"} for i in range(10)]
    items.append({"id": "perm", "text": "bad request [[emulator:status=400]]"})
    items.append({"id": "ctx", "text": "too long [[emulator:context_length]]"})
    await publish_many(js, f"{prefix}.in.tags", items)
    out = batch_events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 12))
    assert out["perm"]["status"] == "error" and out["perm"]["error"]["code"] == "bad_request"
    assert out["ctx"]["error"]["code"] == "context_length_exceeded"
    assert all(out[f"ok{i}"]["status"] == "ok" for i in range(10))
    dlq = events(await read_stream(js, daemon.subjects.stream("DLQ"), f"{prefix}.dlq.tags", 2))
    assert sorted(d["item"]["id"] for d in dlq) == ["ctx", "perm"]


async def test_transient_line_errors_go_into_a_later_batch(make_daemon, nc, prefix, emulator) -> None:
    from service.emulator import FaultConfig

    daemon = await make_daemon(batching=FAST)
    emulator.set_faults(FaultConfig(batch_line_error_rate=0.3))
    js = nc.jetstream()
    await publish_many(js, f"{prefix}.in.tags", [{"id": f"t{i}", "text": f"text {i}"} for i in range(40)])
    await asyncio.sleep(1.5)
    emulator.set_faults(FaultConfig())
    out = batch_events(
        await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 40, timeout_s=40)
    )
    assert len(out) == 40 and all(e["status"] == "ok" for e in out.values())
    assert emulator.stats["batches_created"] >= 2
    assert max(e["attempts"] for e in out.values()) >= 2


async def test_failed_validation_resubmits(make_daemon, nc, prefix, emulator) -> None:
    from service.emulator import FaultConfig

    daemon = await make_daemon(batching=FAST)
    emulator.set_faults(FaultConfig(batch_faults_next=["fail_validation"]))
    js = nc.jetstream()
    await publish_many(js, f"{prefix}.in.tags", [{"id": f"v{i}", "text": f"text {i}"} for i in range(20)])
    out = batch_events(
        await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 20, timeout_s=40)
    )
    assert len(out) == 20 and all(e["status"] in ("ok", "error") for e in out.values())
    errors = [e for e in out.values() if e["status"] == "error"]
    assert all(e["error"]["code"] == "bad_request" for e in errors)
    assert emulator.stats["batches_created"] >= 2
    failed = events(
        await read_stream(js, daemon.subjects.stream("EVENTS"), f"{prefix}.events.batch.failed", 1)
    )
    assert failed[0]["status"] == "failed"
    if errors:
        dlq = events(await read_stream(js, daemon.subjects.stream("DLQ"), f"{prefix}.dlq.tags", len(errors)))
        assert len(dlq) == len(errors)


async def test_expired_batch_keeps_finished_lines_and_resubmits_the_rest(
    make_daemon, nc, prefix, emulator
) -> None:
    from service.emulator import FaultConfig

    daemon = await make_daemon(batching=FAST)
    emulator.set_faults(FaultConfig(batch_faults_next=["expire"], batch_expire_fraction=0.5))
    js = nc.jetstream()
    await publish_many(js, f"{prefix}.in.tags", [{"id": f"e{i}", "text": f"text {i}"} for i in range(30)])
    out = batch_events(
        await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 30, timeout_s=40)
    )
    assert len(out) == 30 and all(e["status"] == "ok" for e in out.values())
    by_batch = Counter(e["batch_id"] for e in out.values())
    assert len(by_batch) == 2
    sent = Counter(emulator.stats["custom_ids_submitted"])
    assert sum(1 for n in sent.values() if n == 2) == min(by_batch.values())  # only the unfinished resent
    await read_stream(js, daemon.subjects.stream("EVENTS"), f"{prefix}.events.batch.expired", 1)


async def test_token_limit_exceeded_backs_off_and_resubmits(make_daemon, nc, prefix, emulator) -> None:
    from service.emulator import FaultConfig

    daemon = await make_daemon(batching=FAST)
    emulator.set_faults(FaultConfig(batch_faults_next=["token_limit"]))
    js = nc.jetstream()
    await publish_many(js, f"{prefix}.in.tags", [{"id": f"k{i}", "text": f"text {i}"} for i in range(10)])
    out = batch_events(
        await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 10, timeout_s=40)
    )
    assert len(out) == 10 and all(e["status"] == "ok" for e in out.values())
    assert emulator.stats["batches_created"] == 2
    failed = events(
        await read_stream(js, daemon.subjects.stream("EVENTS"), f"{prefix}.events.batch.failed", 1)
    )
    assert failed[0]["reason"] == "token_limit_exceeded"


async def test_cancelled_batch_ends_its_items_as_errors(make_daemon, nc, prefix, emulator) -> None:
    from service.emulator import FaultConfig

    daemon = await make_daemon(batching=FAST)
    emulator.set_faults(FaultConfig(batch_faults_next=["cancel"]))
    js = nc.jetstream()
    await publish_many(js, f"{prefix}.in.tags", [{"id": f"c{i}", "text": f"text {i}"} for i in range(10)])
    out = batch_events(
        await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 10, timeout_s=40)
    )
    assert len(out) == 10
    errors = [e for e in out.values() if e["status"] == "error"]
    assert errors and all(e["error"]["code"] == "batch_cancelled" and e["error"]["retryable"] for e in errors)
    dlq = events(await read_stream(js, daemon.subjects.stream("DLQ"), f"{prefix}.dlq.tags", len(errors)))
    assert len(dlq) == len(errors)
    await read_stream(js, daemon.subjects.stream("EVENTS"), f"{prefix}.events.batch.cancelled", 1)


async def test_resubmitted_answered_ids_are_cached_without_provider_calls(
    make_daemon, nc, prefix, emulator
) -> None:
    daemon = await make_daemon(batching={"max_items": 1000, "max_wait_s": 0.5, "poll_interval_s": 0.2})
    js = nc.jetstream(publish_async_max_pending=2000)
    items = [{"id": f"r{i}", "text": f"repeat me {i}"} for i in range(1000)]
    await publish_many(js, f"{prefix}.in.tags", items)
    first = await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 1000, timeout_s=60)
    assert len(first) == 1000

    def inference() -> tuple[int, int, int, int]:
        st = emulator.stats
        return (
            st["batches_created"],
            st["batch_lines_total"],
            st.get("chat_requests_ok", 0),
            st["requests"].get("/v1/files", 0),
        )  # uploads

    before = inference()
    await publish_many(js, f"{prefix}.in.tags", items)
    both = events(
        await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 2000, timeout_s=60)
    )
    cached = [e for e in both[1000:] if e["cached"]]
    assert len(cached) == 1000 and {e["id"] for e in cached} == {f"r{i}" for i in range(1000)}
    assert all(e["cost_usd"] == 0 and e["status"] == "ok" for e in cached)
    # no upload, batch, line or chat call for the re-submitted ids (the first batch may
    # still be deleting its input file, which is why raw request counts are not compared)
    assert inference() == before


async def test_same_id_sent_again_while_in_flight_is_paid_once_and_answered_twice(
    make_daemon, nc, prefix, emulator
) -> None:
    from service.emulator import FaultConfig

    emulator.set_faults(FaultConfig(batch_delay_s=1.0))
    daemon = await make_daemon(batching={"max_wait_s": 0.3, "poll_interval_s": 0.2})
    js = nc.jetstream()
    items = [{"id": f"dup{i}", "text": f"the same note {i}"} for i in range(20)]
    await publish_many(js, f"{prefix}.in.tags", items)
    await asyncio.sleep(0.8)  # the first flush is in flight
    await publish_many(js, f"{prefix}.in.tags", items[:10] + items[:5])  # in flight, and twice
    msgs = await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 35, timeout_s=40)
    got = events(msgs)
    assert len(got) == 35, "every intake message gets its event"
    per_id = Counter(e["id"] for e in got)
    assert all(per_id[f"dup{i}"] == (3 if i < 5 else 2 if i < 10 else 1) for i in range(20))
    assert sum(e["cached"] for e in got) == 15 and all(e["status"] == "ok" for e in got)
    assert all(e["cost_usd"] == 0 for e in got if e["cached"])
    assert emulator.stats["batch_lines_total"] == 20, "each item paid once"


async def wait_until(check: Any, what: str, timeout_s: float = 20.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not await check():
        assert asyncio.get_running_loop().time() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def test_one_fetch_of_mixed_items_each_gets_its_own_ending(make_daemon, nc, prefix, emulator) -> None:
    # Batch-routed items of one fetch are buffered together (NatsSource._take); urgent and
    # bad items in the same fetch still take the per-item path.
    daemon = await make_daemon(batching={"max_wait_s": 3600, "poll_interval_s": 0.3})
    js = nc.jetstream()
    subject = f"{prefix}.in.tags"
    items = [{"id": f"q{i}", "text": f"queued {i}"} for i in range(30)]
    futures = [await js.publish_async(subject, json.dumps(item).encode()) for item in items]
    odd = [
        b"{not json",
        json.dumps({"id": "u1", "text": "now", "priority": "urgent"}).encode(),
        json.dumps({"id": "e1"}).encode(),  # no text
        b'{"id": "deep", "text": "x", "metadata": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}",
        # JSON, but not Unicode text: a bad item (no provider can read it), not a provider error
        b'{"text": "a lone surrogate \\ud800 reads as JSON, not as UTF-8"}',
    ]
    futures += [await js.publish_async(subject, raw) for raw in odd]
    await asyncio.gather(*futures)
    out = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 5))
    assert sorted(e["status"] for e in out) == ["error", "error", "error", "error", "ok"]
    errors = sorted(e["error"]["code"] for e in out if e["status"] == "error")
    assert errors == ["invalid_json", "invalid_json", "invalid_text", "missing_text"]
    assert {e["id"] for e in out if e["status"] == "ok"} == {"u1"}
    buffer = daemon.subjects.stream("BUFFER")

    async def all_buffered_and_acked() -> bool:
        info = await js.consumer_info(daemon.subjects.stream("IN"), daemon.settings.nats.consumer)
        return (await js.stream_info(buffer)).state.messages == 30 and info.num_ack_pending == 0

    await wait_until(all_buffered_and_acked, "30 buffered items and every intake message acked")
    assert daemon.pipeline.counters.buffered == 30


async def test_a_refused_buffer_write_is_redelivered_and_buffered_once(make_daemon, nc, prefix) -> None:
    from nats.js.api import DiscardPolicy

    daemon = await make_daemon(batching={"max_wait_s": 3600, "poll_interval_s": 0.3})
    js = nc.jetstream()
    buffer = daemon.subjects.stream("BUFFER")
    config = (await js.stream_info(buffer)).config
    config.max_msgs, config.discard = 5, DiscardPolicy.NEW  # the buffer refuses all but 5
    await js.update_stream(config)
    await publish_many(js, f"{prefix}.in.tags", [{"id": f"r{i}", "text": f"refused {i}"} for i in range(20)])

    async def five_stored_rest_refused() -> bool:
        info = await js.consumer_info(daemon.subjects.stream("IN"), daemon.settings.nats.consumer)
        return (await js.stream_info(buffer)).state.messages == 5 and info.num_redelivered > 0

    await wait_until(five_stored_rest_refused, "the buffer to refuse writes and intake to redeliver them")
    config.max_msgs = -1
    await js.update_stream(config)

    async def all_buffered_and_acked() -> bool:
        info = await js.consumer_info(daemon.subjects.stream("IN"), daemon.settings.nats.consumer)
        return (await js.stream_info(buffer)).state.messages == 20 and info.num_ack_pending == 0

    await wait_until(all_buffered_and_acked, "every item buffered once the buffer has room", 30)
    sub = await js.pull_subscribe(daemon.subjects.buffer_filter, stream=buffer)
    records = [json.loads(m.data) for m in await sub.fetch(40, timeout=2)]
    assert sorted(r["item"]["id"] for r in records) == sorted(f"r{i}" for i in range(20))


async def test_a_slow_batch_create_is_not_submitted_again_by_the_poll_loop(
    make_daemon, nc, prefix, emulator
) -> None:
    # While the flush loop waits for batches.create, the poll loop sees the flush record
    # "prepared" with an attempt made and nothing listed yet: it must not submit it too.
    from service.emulator import FaultConfig

    emulator.set_faults(FaultConfig(batch_create_latency_s=1.5))
    try:
        daemon = await make_daemon(batching={"max_wait_s": 0.3, "poll_interval_s": 0.1})
        js = nc.jetstream()
        await publish_many(js, f"{prefix}.in.tags", [{"id": f"s{i}", "text": f"slow {i}"} for i in range(20)])
        out = batch_events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 20))
    finally:
        emulator.set_faults(FaultConfig())
    assert all(e["status"] == "ok" for e in out.values())
    assert emulator.stats["batches_created"] == 1, "the same flush was submitted twice"
    sent = Counter(emulator.stats["custom_ids_submitted"])
    assert len(sent) == 20 and set(sent.values()) == {1}


async def test_an_upload_longer_than_the_lease_keeps_its_owner(
    make_daemon, nc, prefix, emulator, tmp_path
) -> None:
    # The submitting replica renews its lease while the batch file uploads, so a second
    # replica polling the record does not take the flush over and submit it again.
    from service.emulator import FaultConfig

    emulator.set_faults(FaultConfig(file_upload_latency_s=2.5))
    fast = {"max_wait_s": 0.3, "poll_interval_s": 0.1, "lease_s": 0.6}
    try:
        first = await make_daemon(state_dir=tmp_path / "a", instance_id="a", batching=fast)
        await make_daemon(state_dir=tmp_path / "b", instance_id="b", batching=fast)
        js = nc.jetstream()
        await publish_many(
            js, f"{prefix}.in.tags", [{"id": f"l{i}", "text": f"long upload {i}"} for i in range(20)]
        )
        out = batch_events(await read_stream(js, first.subjects.stream("OUT"), f"{prefix}.out.tags", 20, 30))
    finally:
        emulator.set_faults(FaultConfig())
    assert all(e["status"] == "ok" for e in out.values())
    sent = Counter(emulator.stats["custom_ids_submitted"])
    assert len(sent) == 20 and set(sent.values()) == {1}, "an item was submitted in two batches"


async def test_a_create_that_answers_500_after_creating_is_reconciled_not_repeated(
    make_daemon, nc, prefix, emulator
) -> None:
    # The provider made the batch but the response was an error: the daemon must find the
    # batch by its flush id (metadata) instead of creating another one.
    from service.emulator import FaultConfig

    emulator.set_faults(FaultConfig(batch_faults_next=["create_500"]))
    try:
        daemon = await make_daemon(batching=FAST)
        js = nc.jetstream()
        await publish_many(
            js, f"{prefix}.in.tags", [{"id": f"c{i}", "text": f"create {i}"} for i in range(10)]
        )
        out = batch_events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 10))
    finally:
        emulator.set_faults(FaultConfig())
    assert all(e["status"] == "ok" for e in out.values())
    assert emulator.stats["faults_injected"]["batch_create_500"] == 1
    assert emulator.stats["batches_created"] == 1
    assert len({e["batch_id"] for e in out.values()}) == 1
