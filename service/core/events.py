"""Result events (CONTRACT §3) and DLQ entries, built as plain dicts. Pure."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from service.core import fastjson
from service.core.cost import Usage
from service.core.errors import ErrorInfo


def iso(ts: datetime) -> str:
    """RFC 3339 in UTC with a ``Z``, millisecond precision."""
    return ts.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True)
class Outcome:
    """What happened to one item, before it is rendered as an event."""

    id: str
    handler: str
    route: str
    model: str | None
    received_at: datetime
    completed_at: datetime
    result: Any = None
    error: ErrorInfo | None = None
    batch_id: str | None = None
    attempts: int = 0
    cached: bool = False
    usage: Usage | None = None
    cost_usd: float | None = None
    metadata: dict[str, Any] | None = None
    source: str | None = None
    handler_version: str | None = None
    packed: int = 1  # how many items shared the provider request (CONTRACT §12)
    # The provider's last message, kept for the DLQ entry (not part of the event).
    last_message: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


def result_event(outcome: Outcome) -> dict[str, Any]:
    return {
        "id": outcome.id,
        "handler": outcome.handler,
        "status": "ok" if outcome.ok else "error",
        "result": outcome.result if outcome.ok else None,
        "error": None if outcome.error is None else outcome.error.to_dict(),
        "route": outcome.route,
        "model": outcome.model,
        "handler_version": outcome.handler_version,
        "batch_id": outcome.batch_id,
        "attempts": outcome.attempts,
        "cached": outcome.cached,
        "packed": outcome.packed,
        "usage": None if outcome.usage is None else outcome.usage.to_dict(),
        "cost_usd": outcome.cost_usd,
        "metadata": outcome.metadata,
        "source": outcome.source,
        "received_at": iso(outcome.received_at),
        "completed_at": iso(outcome.completed_at),
    }


def dlq_entry(
    *,
    id: str,
    handler: str,
    item: dict[str, Any] | None,
    raw: bytes | None,
    error: ErrorInfo,
    attempts: int,
    subject: str,
    failed_at: datetime,
    last_provider_message: str | None = None,
) -> dict[str, Any]:
    """The DLQ record: the original item (or its raw text when it could not be parsed),
    the final error and the attempts, enough for ``enrichd dlq replay``. ``id`` is the
    result event's id, also when the item could not be parsed (then it is salvaged or
    made up, as in the event)."""
    entry: dict[str, Any] = {
        "id": id,
        "handler": handler,
        "item": item,
        "error": error.to_dict(),
        "attempts": attempts,
        "subject": subject,
        "failed_at": iso(failed_at),
        "last_provider_message": last_provider_message,
    }
    if item is None and raw is not None:
        entry["raw"] = raw.decode("utf-8", errors="replace")
    if last_provider_message is not None and len(last_provider_message) > MAX_PROVIDER_MESSAGE:
        entry["last_provider_message"] = last_provider_message[:MAX_PROVIDER_MESSAGE] + "..."
    return entry


MAX_PROVIDER_MESSAGE = 2000
# The largest message the daemon writes when it has not read the server's max_payload:
# NATS's default max_payload (1 MiB) less room for headers (the daemon reads the real one).
HEADER_ROOM = 16 * 1024
DEFAULT_MAX_MESSAGE_BYTES = 1024 * 1024 - HEADER_ROOM


def fitted_entry(entry: dict[str, Any], encode: Callable[[Any], bytes], limit: int) -> bytes:
    """The DLQ entry's payload, at most ``limit`` bytes (a NATS message has a maximum size:
    an entry that cannot be written would leave its item with no ending).

    Too large (an item near the size limit whose encoding grew, a large unreadable body),
    the entry keeps its id, error and everything else, and the item's ``text`` (or the
    ``raw`` body) is cut to fit; ``truncated`` says which field and how long it was. The
    whole original is still where it came from: the intake stream, or the watched
    folder's ``.failed/``."""
    payload = encode(entry)
    if len(payload) <= limit:
        return payload
    item = entry.get("item")
    if isinstance(entry.get("raw"), str):
        path, original = "raw", entry["raw"]
    elif isinstance(item, dict) and isinstance(item.get("text"), str):
        path, original = "item.text", item["text"]
    else:
        path, original = "item", fastjson.dumps(item).decode("utf-8", "replace")
    keep = len(original)
    for _ in range(8):
        if len(payload) <= limit:
            return payload
        # the field is most of the payload: shrink it in proportion, with room to spare
        keep = max(0, min(keep - 1, int(keep * limit / len(payload)) - 256))
        cut = original[:keep]
        trimmed = dict(entry, truncated={"field": path, "chars": len(original), "kept": len(cut)})
        if path == "raw":
            trimmed["raw"] = cut
        elif path == "item.text":
            trimmed["item"] = {**item, "text": cut}  # type: ignore[dict-item]
        else:
            trimmed["item"] = None
            trimmed["raw"] = cut
        payload = encode(trimmed)
    if len(payload) <= limit:
        return payload
    # metadata or another field alone is too large: keep the identity and the error
    slim: dict[str, Any] = {k: entry.get(k) for k in ("id", "handler", "attempts", "subject", "failed_at")}
    error = entry.get("error")
    if isinstance(error, dict):
        slim["error"] = {**error, "message": str(error.get("message", ""))[:500]}
    if isinstance(entry.get("file"), str):  # a watched folder's file
        slim["file"] = entry["file"][:1000]
    slim["item"] = None
    slim["truncated"] = {"field": "entry", "bytes": len(encode(entry))}
    return encode(slim)


def cached_copy(
    stored: dict[str, Any],
    *,
    metadata: Any,
    source: Any,
    received_at: datetime,
    completed_at: datetime,
) -> dict[str, Any]:
    """The stored answer, re-sent for another intake message of the same id: ``cached``,
    no cost, no attempts, and that message's own metadata, source and times."""
    return {
        **stored,
        "cached": True,
        "cost_usd": 0.0,
        "attempts": 0,
        "metadata": metadata,
        "source": source,
        "received_at": iso(received_at),
        "completed_at": iso(completed_at),
    }


def cached_msg_id(item_id: str, handler: str, intake_seq: int | None) -> str:
    """``Nats-Msg-Id`` of a stored answer sent for a new intake message."""
    return f"{item_id}:{handler}:cached:{intake_seq}"


def stored_answer(
    stored_event: dict[str, Any],
    stored_intake_seq: int | None,
    *,
    intake_seq: int | None,
    metadata: Any,
    source: Any,
    received_at: datetime,
    now: datetime,
) -> tuple[dict[str, Any], str, bool]:
    """How an intake message is answered from the result store: (event, Nats-Msg-Id,
    cached). A redelivery of the very message that produced the stored result (a crash
    after storing it) publishes the original event again, deduplicated by its id; any
    other message gets a ``cached`` copy under its own id."""
    item_id, handler = stored_event["id"], stored_event["handler"]
    if intake_seq is not None and stored_intake_seq == intake_seq:
        return stored_event, result_msg_id(item_id, handler), False
    event = cached_copy(
        stored_event, metadata=metadata, source=source, received_at=received_at, completed_at=now
    )
    return event, cached_msg_id(item_id, handler, intake_seq), True


def result_msg_id(item_id: str, handler: str, *, error_intake_seq: int | None = None) -> str:
    """``Nats-Msg-Id`` of a result event: ``<id>:<handler>`` (CONTRACT §1) for an ``ok``
    event. An ``error`` event adds ``:error:<intake seq>``: the same id may be sent again
    (``enrichd dlq replay``, or the producer retrying), and its later ``ok`` event must
    not be dropped by JetStream's duplicate window as a copy of the earlier error.
    Redeliveries of one intake message share one id; an answer to another intake message
    that JetStream drops as a duplicate (the same id answered afresh under a new handler
    version, or on two replicas at once) is sent again by the sink as ``:dup:<seq>``.
    """
    if error_intake_seq is None:
        return f"{item_id}:{handler}"
    return f"{item_id}:{handler}:error:{error_intake_seq}"
