"""Creating the streams and buckets at start-up: idempotent, never dropping data. An
existing stream keeps its configuration and messages; only missing subjects are added."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import BucketNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from service.contract.subjects import Subjects

log = logging.getLogger("enrichd.state")
DAY_S = 86_400.0


@dataclass(frozen=True)
class StreamPlan:
    name: str
    subjects: list[str]
    max_age_s: float
    duplicate_window_s: float = 120.0
    retention: RetentionPolicy = RetentionPolicy.LIMITS


def plans(subjects: Subjects, *, result_dedup_window_s: float) -> list[StreamPlan]:
    p = subjects.prefix
    return [
        # Intake keeps messages 30 days so work waiting (budget, outage) is never aged out early.
        StreamPlan(subjects.stream("IN"), [f"{p}.in.>"], 30 * DAY_S),
        StreamPlan(subjects.stream("OUT"), [f"{p}.out.>"], 7 * DAY_S, result_dedup_window_s),
        StreamPlan(subjects.stream("DLQ"), [f"{p}.dlq.>"], 0.0, result_dedup_window_s),
        StreamPlan(subjects.stream("EVENTS"), [f"{p}.events.>"], 7 * DAY_S, result_dedup_window_s),
        # Buffered items leave the stream when a flush acks them (one consumer per buffer key).
        StreamPlan(
            subjects.stream("BUFFER"),
            [f"{p}._buffer.>"],
            0.0,
            result_dedup_window_s,
            RetentionPolicy.WORK_QUEUE,
        ),
    ]


async def ensure_streams(
    js: JetStreamContext, subjects: Subjects, *, replicas: int, result_dedup_window_s: float
) -> None:
    for plan in plans(subjects, result_dedup_window_s=result_dedup_window_s):
        try:
            info = await js.stream_info(plan.name)
        except NotFoundError:
            await js.add_stream(
                StreamConfig(
                    name=plan.name,
                    subjects=plan.subjects,
                    retention=plan.retention,
                    storage=StorageType.FILE,
                    max_age=plan.max_age_s,
                    duplicate_window=plan.duplicate_window_s,
                    num_replicas=replicas,
                )
            )
            log.info("created stream", extra={"stream": plan.name})
            continue
        config = info.config
        missing = [s for s in plan.subjects if s not in (config.subjects or [])]
        if missing:
            config.subjects = list(config.subjects or []) + missing
            await js.update_stream(config)
            log.info("added subjects to stream", extra={"stream": plan.name, "subjects": missing})


async def open_kv(js: JetStreamContext, name: str, *, replicas: int, ttl_s: float | None = None) -> KeyValue:
    """Bind a KV bucket, creating it (file storage, one revision per key) when missing;
    an existing bucket keeps its configuration and data."""
    try:
        return await js.key_value(name)
    except BucketNotFoundError:
        from nats.js.api import KeyValueConfig

        return await js.create_key_value(
            KeyValueConfig(bucket=name, history=1, ttl=ttl_s, replicas=replicas, storage=StorageType.FILE)
        )


async def keep_at_least(js: JetStreamContext, stream: str, min_age_s: float) -> float:
    """Make ``stream`` keep messages at least ``min_age_s`` (raise its ``max_age`` when it
    is shorter; never lower it, and leave an unlimited one alone). Returns the max_age in
    force, 0 for unlimited."""
    info = await js.stream_info(stream)
    config = info.config
    current = float(config.max_age or 0.0)
    if current == 0.0 or current >= min_age_s:
        return current
    config.max_age = min_age_s
    await js.update_stream(config)
    log.info(
        "raised the stream's max_age for the digests' windows",
        extra={"stream": stream, "max_age_s": min_age_s, "was_s": current},
    )
    return min_age_s
