"""Marks of intake messages answered by promotion (CONTRACT §11): a KV bucket
(``<PREFIX>_PROMOTED``) with one key per intake message, written once its promoted
ending (result event, store or DLQ entry) is durable.

The batch path reads the marks before it sends buffered items (a marked item is taken
out of its buffer, not paid twice) and before it publishes a batch's results (a marked
item's batch answer is never published: one result event per intake message). The
bucket stays small: only promoted items are marked, and marks expire with ``ttl_s``."""

from __future__ import annotations

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NoKeysError
from nats.js.kv import KeyValue

from service.state.results import store_key
from service.state.streams import open_kv


def promotion_key(handler: str, item_id: str, intake_seq: int | None) -> str:
    return f"{store_key(handler, item_id)}.{intake_seq if intake_seq is not None else 'none'}"


class PromotedMarks:
    def __init__(self, kv: KeyValue, bucket: str) -> None:
        self._kv = kv
        self._bucket = bucket

    @classmethod
    async def open(cls, js: JetStreamContext, suffix: str, *, replicas: int, ttl_s: float) -> PromotedMarks:
        bucket = f"{suffix}_PROMOTED"
        return cls(await open_kv(js, bucket, replicas=replicas, ttl_s=ttl_s), bucket)

    def mark_message(self, key: str) -> tuple[str, bytes]:
        """Subject and payload of a mark, for a publisher that pipelines its writes: the
        batch path marks an item with a deadline that it ended with an error, so that a
        promotion scheduled for it later does not answer it a second time."""
        return f"$KV.{self._bucket}.{key}", b"1"

    async def mark(self, key: str) -> None:
        await self._kv.put(key, b"1")

    async def has(self, key: str) -> bool:
        try:
            entry = await self._kv.get(key)
        except KeyNotFoundError:
            return False
        return entry.value is not None

    async def taken(self) -> set[str]:
        """Every marked intake message (the bucket holds promoted items only)."""
        try:
            return set(await self._kv.keys())
        except NoKeysError:
            return set()
