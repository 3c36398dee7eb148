"""Digest state (CONTRACT §15) on JetStream.

- The book: one KV record per digest (bucket ``<SUFFIX>_DIGESTS``) holding its cursor (the
  end of the last closed window) and, while a window is being run, that window's lease
  (owner, lease_until, groups done, attempts). Every change is a compare-and-set on the
  record's revision, so among replicas exactly one runs a window, and closing it (the
  cursor moves on, the lease goes) is one atomic step.
- The members: read from the OUT stream itself, by JetStream message time, with an
  ephemeral consumer (nothing is collected elsewhere, so nothing can be lost)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

import nats.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import KeyNotFoundError, KeyWrongLastSequenceError
from nats.js.kv import KeyValue

from service.core import fastjson
from service.state.streams import open_kv

log = logging.getLogger("enrichd.state")
READ_BATCH = 500


@dataclass(frozen=True)
class Lease:
    """The window being run: who runs it, until when, and what is done."""

    start: float  # Unix seconds
    end: float
    owner: str
    lease_until: float
    done: tuple[str, ...] = ()  # group tokens published
    attempts: dict[str, int] = field(default_factory=dict)  # group token -> failed runs

    def to_dict(self) -> dict[str, Any]:
        return {
            "start": self.start,
            "end": self.end,
            "owner": self.owner,
            "lease_until": self.lease_until,
            "done": list(self.done),
            "attempts": dict(self.attempts),
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Lease:
        return cls(
            start=float(data["start"]),
            end=float(data["end"]),
            owner=str(data["owner"]),
            lease_until=float(data["lease_until"]),
            done=tuple(data.get("done") or ()),
            attempts={str(k): int(v) for k, v in (data.get("attempts") or {}).items()},
        )


@dataclass(frozen=True)
class DigestRecord:
    cursor: float  # Unix seconds: the end of the last closed window (the next one starts here)
    window: Lease | None = None

    def encode(self) -> bytes:
        window = None if self.window is None else self.window.to_dict()
        return fastjson.dumps({"cursor": self.cursor, "window": window})

    @classmethod
    def decode(cls, raw: bytes) -> DigestRecord:
        data = fastjson.loads(raw)
        window = data.get("window")
        return cls(float(data["cursor"]), None if window is None else Lease.from_dict(window))

    def with_window(self, window: Lease | None) -> DigestRecord:
        return replace(self, window=window)


class DigestBook:
    """The digests' records, read and changed by revision (compare-and-set)."""

    def __init__(self, kv: KeyValue) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, js: JetStreamContext, stream_suffix: str, *, replicas: int) -> DigestBook:
        return cls(await open_kv(js, f"{stream_suffix}_DIGESTS", replicas=replicas))

    async def get(self, name: str) -> tuple[DigestRecord, int] | None:
        try:
            entry = await self._kv.get(name)
        except KeyNotFoundError:
            return None
        if entry.value is None or entry.revision is None:
            return None
        return DigestRecord.decode(entry.value), entry.revision

    async def create(self, name: str, record: DigestRecord) -> int | None:
        """The new revision, or None when another replica created it first."""
        try:
            return await self._kv.create(name, record.encode())
        except KeyWrongLastSequenceError:
            return None

    async def update(self, name: str, record: DigestRecord, revision: int) -> int | None:
        """The new revision, or None when the record changed since ``revision``."""
        try:
            return await self._kv.update(name, record.encode(), last=revision)
        except KeyWrongLastSequenceError:
            return None


def _epoch(ts: datetime) -> float:
    return ts.timestamp()


async def read_window(
    js: JetStreamContext,
    stream: str,
    subject: str,
    start: datetime,
    end: datetime,
    *,
    limit: int | None = None,
) -> list[dict[str, Any]]:
    """The events on ``subject`` whose JetStream time is in ``[start, end)``, in stream
    order (at most ``limit``). Reading stops at the first message at or after ``end``,
    or when the stream has nothing more (caught up)."""
    config = ConsumerConfig(
        deliver_policy=DeliverPolicy.BY_START_TIME,
        opt_start_time=start.astimezone(UTC),
        ack_policy=AckPolicy.NONE,
        inactive_threshold=30.0,
    )
    sub = await js.pull_subscribe(subject, stream=stream, config=config)
    out: list[dict[str, Any]] = []
    end_s = _epoch(end)
    try:
        info = await sub.consumer_info()
        pending = int(info.num_pending or 0)
        while pending > 0 and (limit is None or len(out) < limit):
            try:
                msgs = await sub.fetch(min(READ_BATCH, pending), timeout=5.0)
            except (TimeoutError, nats.errors.TimeoutError):
                break  # nothing more arrived: caught up
            for msg in msgs:
                meta = msg.metadata
                pending = meta.num_pending
                if meta.timestamp.timestamp() >= end_s:
                    return out
                try:
                    out.append(fastjson.loads(msg.data))
                except ValueError:
                    log.warning("an unreadable event on the results stream", extra={"subject": msg.subject})
                if limit is not None and len(out) >= limit:
                    break
    finally:
        try:
            await sub.unsubscribe()
        except Exception:  # noqa: BLE001 - the ephemeral consumer goes by itself (inactive_threshold)
            pass
    return out
