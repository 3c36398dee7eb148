"""Durable batch state on JetStream (design: docs/durability.md).

* ``<P>_BATCHES`` (KV): one record per flush, keyed by its flush id. It says which
  provider batch holds the flush, who owns it (``owner`` + ``lease_until``), and how far
  results were published. Every update is compare-and-set on the KV revision, so two
  replicas never both act on one record.
* ``<P>_FLUSHES`` (object store): the items of each flush, as JSONL, written before the
  buffer messages are acked and deleted once every result is published.
"""

from __future__ import annotations

import io
import json
from collections.abc import Container, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from nats.js import JetStreamContext
from nats.js.api import ObjectStoreConfig, StorageType
from nats.js.errors import BucketNotFoundError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError
from nats.js.kv import KeyValue
from nats.js.object_store import ObjectStore

from service.core import fastjson
from service.state.streams import open_kv

# prepared → submitted → finished → published; failed provider batches go back to prepared.
ACTIVE_STATES = ("prepared", "submitted", "finished")


@dataclass
class BatchRecord:
    flush_id: str
    endpoint: str
    model: str
    provider: str
    state: str
    created_at: float
    count: int
    size_bytes: int
    tokens: int
    buffer_ranges: list[list[int]]
    owner: str
    lease_until: float
    batch_id: str | None = None
    input_file_id: str | None = None
    provider_status: str | None = None
    request_counts: dict[str, int] = field(default_factory=dict)
    submit_attempts: int = 0
    not_before: float = 0.0
    published_upto: int = 0
    outcome: dict[str, int] = field(default_factory=dict)
    previous_batch_ids: list[str] = field(default_factory=list)
    note: str | None = None
    status_changed_at: float = 0.0
    budget_day: str | None = None
    reserved_usd: float = 0.0
    # A run of permanent provider failures (service.core.batch_faults.Fault), if any.
    fault_step: str | None = None
    fault_code: str | None = None
    fault_since: float = 0.0
    fault_count: int = 0
    lost_batches: int = 0  # batches of this flush the provider lost (or lost the output of)
    end_error: dict[str, Any] | None = None  # set: every item ends with this error
    promote_at: float | None = None  # when the first item with a deadline is due for promotion
    revision: int = 0  # KV revision this copy was read at (not stored)

    def to_json(self) -> bytes:
        data = asdict(self)
        data.pop("revision")
        return json.dumps(data, separators=(",", ":")).encode()

    @classmethod
    def from_json(cls, raw: bytes, revision: int) -> BatchRecord:
        data: dict[str, Any] = json.loads(raw)
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known, revision=revision)

    def holds_seq(self, seq: int) -> bool:
        return any(a <= seq <= b for a, b in self.buffer_ranges)

    def event_body(self, at: str) -> dict[str, Any]:
        """The common part of the ``enrich.events.batch.*`` payloads (``at``: RFC 3339)."""
        return {
            "batch_id": self.batch_id,
            "flush_id": self.flush_id,
            "model": self.model,
            "endpoint": self.endpoint,
            "items": self.count,
            "tokens": self.tokens,
            "request_counts": self.request_counts,
            "status": self.provider_status,
            "at": at,
        }


def seq_ranges(seqs: list[int]) -> list[list[int]]:
    """Compress sorted stream sequences into inclusive ranges."""
    out: list[list[int]] = []
    for seq in sorted(seqs):
        if out and seq == out[-1][1] + 1:
            out[-1][1] = seq
        else:
            out.append([seq, seq])
    return out


class StaleRecordError(Exception):
    """Another writer changed the record since we read it."""


class BatchStore:
    def __init__(self, kv: KeyValue, objects: ObjectStore) -> None:
        self._kv = kv
        self._objects = objects

    @classmethod
    async def open(cls, js: JetStreamContext, prefix: str, *, replicas: int) -> BatchStore:
        records = f"{prefix}_BATCHES"
        flushes = f"{prefix}_FLUSHES"
        # Records outlive their batch by 30 days so `enrichd batches list` can show history.
        kv = await open_kv(js, records, replicas=replicas, ttl_s=30 * 86_400)
        try:
            objects = await js.object_store(flushes)
        except (BucketNotFoundError, NotFoundError):
            objects = await js.create_object_store(
                flushes, ObjectStoreConfig(bucket=flushes, replicas=replicas, storage=StorageType.FILE)
            )
        return cls(kv, objects)

    async def get(self, flush_id: str) -> BatchRecord | None:
        try:
            entry = await self._kv.get(flush_id)
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        return BatchRecord.from_json(entry.value, entry.revision or 0)

    async def create(self, record: BatchRecord) -> BatchRecord:
        """Insert a new record; raises StaleRecordError when the flush id exists."""
        try:
            record.revision = await self._kv.create(record.flush_id, record.to_json())
        except KeyWrongLastSequenceError:
            raise StaleRecordError(record.flush_id) from None
        return record

    async def update(self, record: BatchRecord) -> BatchRecord:
        """Compare-and-set on the revision we read."""
        try:
            record.revision = await self._kv.update(record.flush_id, record.to_json(), last=record.revision)
        except KeyWrongLastSequenceError:
            raise StaleRecordError(record.flush_id) from None
        return record

    async def all(self) -> list[BatchRecord]:
        try:
            keys = await self._kv.keys()
        except Exception:  # noqa: BLE001 - nats-py raises NoKeysError on an empty bucket
            return []
        out = []
        for key in keys:
            record = await self.get(key)
            if record is not None:
                out.append(record)
        return sorted(out, key=lambda r: r.created_at)

    async def put_items(self, flush_id: str, lines: list[bytes]) -> None:
        await self._objects.put(flush_id, b"".join(lines))

    async def iter_items(self, flush_id: str) -> Iterator[dict[str, Any]]:
        """The flush's items in order, each decoded only when reached: a decoded item
        takes several times the memory of its line."""
        # Into a buffer: without ``writeinto`` nats-py 2.16 joins the chunks with
        # ``bytes +=``, quadratic in the object's size (38 s for a 78 MB flush).
        buffer = io.BytesIO()
        await self._objects.get(flush_id, writeinto=buffer)
        buffer.seek(0)
        return (fastjson.loads(line) for line in buffer if line.strip())

    async def items(self, flush_id: str, *, bodies: bool | Container[int] = True) -> list[dict[str, Any]]:
        """The flush's items in order. ``bodies``: keep every request body (True), none
        (False), or only those of the items at these indices."""
        out = []
        for index, item in enumerate(await self.iter_items(flush_id)):
            if bodies is not True and (bodies is False or index not in bodies):
                item.pop("body", None)
            out.append(item)
        return out

    async def drop_items(self, flush_id: str) -> None:
        try:
            await self._objects.delete(flush_id)
        except Exception:  # noqa: BLE001 - already gone is fine
            pass
