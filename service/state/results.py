"""The result store (CONTRACT §6): a JetStream KV bucket with a TTL of ``results.ttl_s``.

A record holds the result event and the intake stream sequence that produced it, so a
redelivery of that same message is told apart from a re-submission (which is answered
with ``cached: true``)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from service.core import fastjson


def store_key(handler: str, item_id: str) -> str:
    # KV keys allow [-/_=.A-Za-z0-9]; ids allow ':' and '.', which we escape reversibly.
    escaped = item_id.replace("=", "=3D").replace(":", "=3A").replace(".", "=2E")
    return f"{handler}.{escaped}"


@dataclass(frozen=True)
class StoredResult:
    event: dict[str, Any]
    intake_seq: int | None


class ResultStore:
    def __init__(self, kv: KeyValue, bucket: str) -> None:
        self._kv = kv
        self._bucket = bucket

    async def get(self, handler: str, item_id: str, version: str | None = None) -> StoredResult | None:
        """The stored ``ok`` event of (handler, id); with ``version``, only when it was
        answered by that handler version (CONTRACT §13: a changed prompt, model or schema
        is enriched afresh, and its answer then replaces the old one)."""
        try:
            entry = await self._kv.get(store_key(handler, item_id))
        except KeyNotFoundError:
            return None
        if entry.value is None:
            return None
        data = fastjson.loads(entry.value)
        if version is not None and data["event"].get("handler_version") != version:
            return None
        return StoredResult(event=data["event"], intake_seq=data.get("intake_seq"))

    def put_message_json(
        self, handler: str, item_id: str, event_json: str, *, intake_seq: int | None
    ) -> tuple[str, bytes]:
        """Subject and payload of the KV put of an event already serialised, for pipelined
        (publish_async) writes."""
        value = '{"event":' + event_json + ',"intake_seq":' + json.dumps(intake_seq) + "}"
        return f"$KV.{self._bucket}.{store_key(handler, item_id)}", value.encode()

    async def put(self, event: dict[str, Any], *, intake_seq: int | None) -> None:
        value = fastjson.dumps({"event": event, "intake_seq": intake_seq})
        await self._kv.put(store_key(event["handler"], event["id"]), value)
