"""Ratio benchmarks of the batch path: intake into the buffers (1), building and
uploading a 50,000-line batch file (2), publishing 50,000 batch results (3)."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from bench.harness import Check, Env, item_1k, median, publish_all, wait_count

INTAKE_ITEMS = 20_000
FLUSH_ITEMS = 50_000
RESULT_ITEMS = 50_000


def no_flush() -> dict[str, Any]:
    """Batching settings under which the daemon's flush loop never flushes on its own:
    the largest thresholds, and a flush window twelve hours away from now."""
    hour = (datetime.now(UTC).hour + 12) % 24
    return {
        "max_items": 50_000,
        "max_wait_s": 86_400,
        "poll_interval_s": 3600,
        "windows": [f"* {hour} * * *"],
    }


# -- 1. intake into the batch buffers ------------------------------------------------------


async def raw_pull(
    js: JetStreamContext, stream: str, subject: str, count: int, durable: str = "raw_bench"
) -> float:
    """A plain nats-py durable pull consumer: fetch, ack every message. Items per second
    between the first and the last message acked."""
    sub = await js.pull_subscribe(
        subject,
        durable=durable,
        stream=stream,
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=2048),
    )
    got, first, last = 0, 0.0, 0.0
    while got < count:
        try:
            msgs = await sub.fetch(256, timeout=1.0)
        except TimeoutError:
            continue
        for msg in msgs:
            await msg.ack()
            got += 1
            if got == 1:
                first = time.perf_counter()
        last = time.perf_counter()
    await sub.unsubscribe()
    return (got - 1) / (last - first)


async def buffered_rate(js: JetStreamContext, stream: str) -> tuple[float, int]:
    """Items per second the daemon wrote to its buffer stream, from the server's own
    timestamps of the first and last buffered message."""
    info = await js.stream_info(stream)
    first = await js.get_msg(stream, seq=info.state.first_seq)
    last = await js.get_msg(stream, seq=info.state.last_seq)
    assert first.time is not None and last.time is not None
    span_s = (last.time - first.time).total_seconds()
    return (info.state.messages - 1) / span_s, info.state.messages


async def bench_intake(env: Env) -> list[Check]:
    from service.contract.subjects import Subjects
    from service.state.streams import ensure_streams

    prefix, n = "rintake", INTAKE_ITEMS
    subjects = Subjects(prefix)
    js = env.js
    await ensure_streams(js, subjects, replicas=1, result_dedup_window_s=3600)
    await publish_all(js, f"{prefix}.in.tags", (item_1k(i) for i in range(n)))
    # The intake stream keeps acked messages (limits retention), so the raw consumer can
    # read them before and after the daemon: the mean of the two is the baseline, which
    # evens out the machine's drift during the run (a raw pass takes under a second).
    raw_before = await raw_pull(js, subjects.stream("IN"), subjects.intake_filter, n, "raw_before")
    started = time.perf_counter()
    await env.daemon(prefix, batching=no_flush())
    done = await wait_count(js, subjects.stream("BUFFER"), n, timeout_s=240)
    daemon_rate, buffered = await buffered_rate(js, subjects.stream("BUFFER"))
    raw_after = await raw_pull(js, subjects.stream("IN"), subjects.intake_filter, n, "raw_after")
    raw_rate = (raw_before + raw_after) / 2
    return [
        Check(
            "intake",
            "intake rate / raw pull-consumer rate",
            daemon_rate / raw_rate,
            ">=",
            0.6,
            measured=f"{daemon_rate:,.0f} vs {raw_rate:,.0f} items/s ({n:,} × 1 KB)",
            extra={
                "items": n,
                "daemon_items_per_s": round(daemon_rate),
                "raw_items_per_s": round(raw_rate),
                "raw_before_after_per_s": [round(raw_before), round(raw_after)],
                "daemon_wall_s_incl_start": round(done - started, 2),
                "buffered": buffered,
            },
        )
    ]


# -- 2. flushing 50,000 items: JSONL build + upload ------------------------------------------


def buffered_records(
    pipeline: Any, prefix: str, count: int, start: int = 0
) -> list[tuple[str, dict[str, Any]]]:
    """(buffer subject token, record) as Pipeline._buffer writes them, for ``count`` items
    parsed by the daemon's own pipeline; each record also gets the request body that the
    flush builds (``body``, not part of a buffer message: full_flush leaves it out)."""
    from service.core.intake import Intake, buffer_record
    from service.core.routing import BatchRoute, BufferKey

    now = datetime.now(UTC)
    out = []
    for i in range(start, start + count):
        intake = Intake(
            raw=item_1k(i), handler="tags", subject=f"{prefix}.in.tags", received_at=now, seq=i + 1
        )
        prepared = pipeline.prepare(intake)
        spec = pipeline.config.registry[intake.handler]
        key = BufferKey(pipeline.config.rules.provider, spec.endpoint, spec.model)
        record = buffer_record(intake, prepared.item, BatchRoute(key))
        out.append((key.subject_token(), {**record, "body": prepared.body}))
    return out


async def plain_upload(client: Any, lines: list[tuple[str, str, dict[str, Any]]]) -> float:
    """The baseline: one json.dumps per line, one files.create. Seconds."""
    started = time.perf_counter()
    text = "".join(
        json.dumps({"custom_id": cid, "method": "POST", "url": url, "body": body}) + "\n"
        for cid, url, body in lines
    )
    f = await client.files.create(file=("plain.jsonl", text.encode(), "application/jsonl"), purpose="batch")
    took = time.perf_counter() - started
    await client.files.delete(f.id)
    return took


async def daemon_upload(provider: Any, lines: list[tuple[str, str, dict[str, Any]]]) -> float:
    """The daemon's own build + upload: service.core.batchfile.to_jsonl and
    OpenAIBatchProvider.upload (what Submitter.submit calls). Seconds."""
    from service.core.batchfile import to_jsonl

    started = time.perf_counter()
    data = to_jsonl(((cid, body) for cid, _, body in lines), url=lines[0][1])
    file_id = await provider.upload("daemon.jsonl", data)
    took = time.perf_counter() - started
    await provider.delete_file(file_id)
    return took


def timed(obj: Any, name: str, spans: dict[str, float], label: str) -> None:
    """Record the time spent in ``obj.name`` (an async method) into ``spans[label]``."""
    inner = getattr(obj, name)

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await inner(*args, **kwargs)
        finally:
            spans[label] = spans.get(label, 0.0) + time.perf_counter() - started

    setattr(obj, name, wrapper)


async def bench_flush(env: Env, *, rounds: int = 3) -> list[Check]:
    from openai import AsyncOpenAI

    from bench.harness import KEY
    from service.core.batchfile import custom_id

    prefix, n = "rflush", FLUSH_ITEMS
    daemon = await env.daemon(prefix, batching=no_flush())
    records = buffered_records(daemon.pipeline, prefix, n)
    lines = [
        (custom_id(r["handler"], r["item"]["id"], r["intake_seq"]), r["endpoint"], r["body"])
        for _, r in records
    ]
    size = sum(len(json.dumps(body)) + 80 for _, _, body in lines)
    client = AsyncOpenAI(base_url=env.base_url, api_key=KEY, max_retries=0, timeout=120)
    provider = daemon.batcher.provider
    await plain_upload(client, lines[:100])  # warm both connections
    await daemon_upload(provider, lines[:100])
    plain, ours = [], []
    for _ in range(rounds):
        plain.append(await plain_upload(client, lines))
        ours.append(await daemon_upload(provider, lines))
    await client.close()
    full = await full_flush(env, daemon, records)
    base = median(plain)
    ratio = median(o / p for o, p in zip(ours, plain, strict=True))  # rounds alternate: pair them
    return [
        Check(
            "flush",
            "JSONL build + upload time / json.dumps + files.create time",
            ratio,
            "<=",
            1.5,
            measured=f"{median(ours):.2f} s vs {base:.2f} s ({n:,} lines, {size / 1e6:.0f} MB)",
            extra={
                "daemon_s": [round(x, 3) for x in ours],
                "plain_s": [round(x, 3) for x in plain],
                "full_flush_s": round(full["total"], 2),
                "full_flush_ratio": round(full["total"] / base, 2),
                "full_flush_phases_s": {k: round(v, 2) for k, v in full.items()},
            },
        )
    ]


async def full_flush(env: Env, daemon: Any, records: list[tuple[str, dict[str, Any]]]) -> dict[str, float]:
    """Batcher.flush on a buffer of 50,000 items, end to end: fetch and decode the buffered
    records, estimate tokens, write the flush (object store + KV record), ack, build the
    JSONL, upload, batches.create. Phases timed around the daemon's own methods."""
    js = env.js
    subject = daemon.subjects.buffer(records[0][0])
    for _, record in records:
        msg_id = f"{record['handler']}:{record['item']['id']}:{record['intake_seq']}"
        message = {k: v for k, v in record.items() if k != "body"}  # the flush builds the body
        await js.publish_async(subject, json.dumps(message).encode(), headers={"Nats-Msg-Id": msg_id})
    await js.publish_async_completed()
    await wait_count(js, daemon.subjects.stream("BUFFER"), len(records), timeout_s=60)
    batcher = daemon.batcher
    batcher.request_stop()  # its own loops stay out of the way (flush() does not check)
    spans: dict[str, float] = {}
    for name in ("put_items", "create", "items"):
        timed(batcher.store, name, spans, f"store.{name}")
    for name in ("upload", "create"):
        timed(batcher.provider, name, spans, f"provider.{name}")
    started = time.perf_counter()
    record = await batcher.flush(subject)
    spans["total"] = time.perf_counter() - started
    assert record is not None and record.count == len(records), record
    assert record.state == "submitted", record.state
    return spans


# -- 3. publishing 50,000 batch results -----------------------------------------------------


async def raw_publish(js: JetStreamContext, messages: list[tuple[str, bytes, dict[str, str]]]) -> float:
    """The baseline: nats-py publish_async of every message, then wait for all acks. Seconds."""
    started = time.perf_counter()
    for subject, payload, headers in messages:
        await js.publish_async(subject, payload, headers=headers or None)
    await js.publish_async_completed()
    return time.perf_counter() - started


def finished_batch(daemon: Any, records: list[tuple[str, dict[str, Any]]], flush_id: str) -> tuple[Any, Any]:
    """A finished provider batch of these records, as Lifecycle._finish hands it over."""
    from service.core.batch_info import BatchInfo
    from service.state.batches import BatchRecord

    first = records[0][1]
    now = time.time()
    record = BatchRecord(
        flush_id=flush_id,
        endpoint=first["endpoint"],
        model=first["model"],
        provider="openai",
        state="finished",
        created_at=now,
        count=len(records),
        size_bytes=0,
        tokens=0,
        buffer_ranges=[[1, len(records)]],
        owner=daemon.batcher.instance_id,
        lease_until=now + 600,
        batch_id=f"batch_{flush_id}",
        provider_status="completed",
    )
    counts = {"total": len(records), "completed": len(records), "failed": 0}
    info = BatchInfo(f"batch_{flush_id}", "completed", int(now), "file-out", None, counts)
    return record, info


def to_prefix(messages: list[tuple[str, bytes, dict[str, str]]], old: str, new: str, tag: str) -> list[Any]:
    """The same payloads on another prefix's streams (and KV bucket), with their own
    message ids, so the baseline neither collides with nor is deduplicated against the
    daemon's messages."""
    out = []
    for subject, payload, headers in messages:
        subject = subject.replace(f"{old}.", f"{new}.", 1).replace(
            f"$KV.{old.upper()}_", f"$KV.{new.upper()}_", 1
        )
        if "Nats-Msg-Id" in headers:
            headers = {**headers, "Nats-Msg-Id": headers["Nats-Msg-Id"] + tag}
        out.append((subject, payload, headers))
    return out


async def bench_results(env: Env, *, rounds: int = 2) -> list[Check]:
    from service.contract.subjects import Subjects
    from service.core.batch_outcomes import Ok
    from service.core.batchfile import custom_id
    from service.core.cost import Usage
    from service.state.streams import ensure_streams, open_kv

    prefix, raw_prefix, n = "rres", "rraw", RESULT_ITEMS
    daemon = await env.daemon(prefix, batching=no_flush())
    batcher = daemon.batcher
    batcher.request_stop()  # the poll loop would try to follow the made-up batches
    js = env.js
    raw = Subjects(raw_prefix)
    await ensure_streams(js, raw, replicas=1, result_dedup_window_s=3600)
    await open_kv(js, raw.results_bucket, replicas=1, ttl_s=7 * 86_400)
    raw_s: list[float] = []
    daemon_s: list[float] = []
    for k in range(rounds):  # raw, daemon, raw, daemon, raw: each daemon run between two raw ones
        records = buffered_records(daemon.pipeline, prefix, n, start=k * n)
        items = [{**r, "cid": custom_id(r["handler"], r["item"]["id"], r["intake_seq"])} for _, r in records]
        actions = [Ok({"tags": ["invoice", "meeting", "budget"]}, Usage(265, 12)) for _ in items]
        record, info = finished_batch(daemon, records, f"fresults{k}")
        # The messages the daemon will send (result-store put + result event per item).
        messages = [
            m
            for it, act in zip(items, actions, strict=True)
            for m in batcher.publisher.messages(record, it, act)
        ]
        if not raw_s:
            raw_s.append(await raw_publish(js, to_prefix(messages, prefix, raw_prefix, ":r0")))
        record = await batcher.store.create(record)
        started = time.perf_counter()
        await batcher.publisher.publish(record, info, items, actions)
        daemon_s.append(time.perf_counter() - started)
        raw_s.append(await raw_publish(js, to_prefix(messages, prefix, raw_prefix, f":r{k + 1}")))
    ratios = [(raw_s[k] + raw_s[k + 1]) / 2 / daemon_s[k] for k in range(rounds)]
    out = await js.stream_info(daemon.subjects.stream("OUT"))
    assert out.state.messages == rounds * n, out.state.messages
    ours, base = median(daemon_s), median(raw_s)
    return [
        Check(
            "results",
            "result publishing rate / raw publish_async rate",
            median(ratios),
            ">=",
            0.5,
            measured=f"{n / ours:,.0f} vs {n / base:,.0f} items/s ({len(messages) // n} messages each)",
            extra={
                "items": n,
                "messages": len(messages),
                "results_chunk": batcher.publisher.results_chunk,
                "daemon_s": [round(x, 2) for x in daemon_s],
                "raw_s": [round(x, 2) for x in raw_s],
                "ratios": [round(x, 3) for x in ratios],
            },
        )
    ]
