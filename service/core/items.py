"""Items (CONTRACT §2): parsing and validation, pure.

``parse_item`` turns the raw bytes of an intake message into an :class:`Item` or raises
:class:`BadItemError` with a precise code. Nothing here touches the network or the clock.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Literal

from service.core import fastjson
from service.core.errors import BadItemError

Priority = Literal["urgent", "high", "normal", "low"]
PRIORITIES: tuple[Priority, ...] = ("urgent", "high", "normal", "low")
ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
ALLOWED_KEYS = frozenset({"id", "text", "fields", "priority", "deadline", "metadata", "source"})


@dataclass(frozen=True)
class Item:
    """A validated item. ``id`` is always set (derived from content when not given)."""

    id: str
    handler: str
    text: str
    fields: dict[str, str] = field(default_factory=dict)
    priority: Priority = "normal"
    deadline: datetime | None = None
    metadata: dict[str, Any] | None = None
    source: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The item as JSON-able dict, in the contract's shape (used for DLQ and buffers)."""
        out: dict[str, Any] = {"id": self.id, "text": self.text, "priority": self.priority}
        if self.fields:
            out["fields"] = self.fields
        if self.deadline is not None:
            out["deadline"] = self.deadline.isoformat().replace("+00:00", "Z")
        if self.metadata is not None:
            out["metadata"] = self.metadata
        if self.source is not None:
            out["source"] = self.source
        return out


def default_id(handler: str, text: str, fields: dict[str, str]) -> str:
    """Hex SHA-256 of the handler name and the canonical JSON of ``text`` + ``fields``."""
    canonical = json.dumps(
        {"text": text, "fields": fields}, sort_keys=True, separators=(",", ":"), ensure_ascii=False
    )
    # surrogatepass: a lone surrogate (legal in a JSON string escape) still hashes
    return hashlib.sha256(f"{handler}\n{canonical}".encode("utf-8", "surrogatepass")).hexdigest()


def raw_id(raw: bytes) -> str:
    """A stable id for a message that could not be parsed far enough to have one."""
    return "raw-" + hashlib.sha256(raw).hexdigest()[:40]


def parse_deadline(value: Any) -> datetime:
    if not isinstance(value, str):
        raise BadItemError("invalid_deadline", "deadline must be an RFC 3339 string")
    text = value.strip()
    if text.endswith(("Z", "z")):
        text = text[:-1] + "+00:00"
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise BadItemError("invalid_deadline", f"deadline {value!r} is not RFC 3339") from None
    if "T" not in text.upper() or parsed.tzinfo is None:
        raise BadItemError("invalid_deadline", f"deadline {value!r} needs a date, a time and a zone")
    return parsed


def decode_object(raw: bytes, *, max_bytes: int) -> dict[str, Any]:
    """Bytes → JSON object, with the size, UTF-8 and JSON checks in contract order."""
    if len(raw) > max_bytes:
        raise BadItemError("item_too_large", f"item is {len(raw)} bytes; the limit is {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadItemError("invalid_utf8", f"body is not UTF-8 (byte {exc.start})") from None
    try:
        data = fastjson.loads(text)
    except json.JSONDecodeError as exc:
        raise BadItemError("invalid_json", f"body is not JSON: {exc.msg} at line {exc.lineno}") from None
    except RecursionError:
        raise BadItemError(
            "invalid_json", "body is not JSON this daemon can read: nested too deeply"
        ) from None
    except ValueError as exc:
        # e.g. an integer of more than 4,300 digits: Python refuses to convert it
        raise BadItemError("invalid_json", f"body is not JSON this daemon can read: {_short(exc)}") from None
    if not isinstance(data, dict):
        raise BadItemError("not_an_object", f"item must be a JSON object, got {type(data).__name__}")
    return data


def _short(exc: BaseException, limit: int = 200) -> str:
    text = str(exc)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def lone_surrogate(text: str) -> int | None:
    """Index of the first lone surrogate (``"\\ud800"`` is legal JSON, but not Unicode
    text: it cannot be encoded as UTF-8 and no provider can read it), else None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def _fields(value: Any) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise BadItemError("invalid_fields", "fields must be an object whose values are strings")
    for key, text in value.items():
        if lone_surrogate(key) is not None or lone_surrogate(text) is not None:
            raise BadItemError(
                "invalid_fields", f"field {key!r} holds a lone surrogate escape (not Unicode text)"
            )
    return dict(value)


def _text(data: dict[str, Any]) -> str:
    if "text" not in data:
        raise BadItemError("missing_text", "item has no 'text'")
    text = data["text"]
    if not isinstance(text, str):
        raise BadItemError("invalid_text", f"'text' must be a string, got {type(text).__name__}")
    if not text.strip():
        raise BadItemError("empty_text", "'text' is empty")
    at = lone_surrogate(text)
    if at is not None:
        raise BadItemError(
            "invalid_text",
            f"'text' holds a lone surrogate escape at character {at} "
            "(not Unicode text: no model can read it)",
        )
    return text


def item_from_object(data: dict[str, Any], handler: str, *, priority: Priority | None = None) -> Item:
    """Validate a decoded object. ``priority``, when given, is the default for items without one."""
    unknown = sorted(set(data) - ALLOWED_KEYS)
    if unknown:
        raise BadItemError("unknown_field", f"unknown key(s): {', '.join(unknown)}")
    text = _text(data)
    fields = _fields(data.get("fields"))
    item_id = data.get("id")
    if item_id is None:
        item_id = default_id(handler, text, fields)
    elif not isinstance(item_id, str) or not ID_RE.match(item_id):
        raise BadItemError("invalid_id", "id must be 1-128 characters of A-Za-z0-9._:-")
    prio = data.get("priority", priority or "normal")
    if prio not in PRIORITIES:
        raise BadItemError("invalid_priority", f"priority must be one of {', '.join(PRIORITIES)}")
    deadline = parse_deadline(data["deadline"]) if data.get("deadline") is not None else None
    metadata = data.get("metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise BadItemError("invalid_metadata", "metadata must be an object")
    source = data.get("source")
    if source is not None and not isinstance(source, str):
        raise BadItemError("invalid_source", "source must be a string")
    return Item(
        id=item_id,
        handler=handler,
        text=text,
        fields=fields,
        priority=prio,
        deadline=deadline,
        metadata=metadata,
        source=source,
    )


def parse_item(raw: bytes, handler: str, *, max_bytes: int) -> Item:
    """Parse one intake message body. Raises :class:`BadItemError`."""
    return item_from_object(decode_object(raw, max_bytes=max_bytes), handler)


def salvage(raw: bytes) -> tuple[str, dict[str, Any] | None, str | None]:
    """Best effort for a bad item: its id, metadata and source when they can be read.

    Lets an error event for a broken item still echo what the producer sent.
    """
    try:
        data = json.loads(raw.decode("utf-8"))
    except (ValueError, RecursionError):  # not UTF-8, not JSON, or JSON Python cannot hold
        return raw_id(raw), None, None
    if not isinstance(data, dict):
        return raw_id(raw), None, None
    item_id = data.get("id")
    if not isinstance(item_id, str) or not ID_RE.match(item_id):
        item_id = raw_id(raw)
    metadata = data.get("metadata") if isinstance(data.get("metadata"), dict) else None
    source = data.get("source") if isinstance(data.get("source"), str) else None
    return item_id, metadata, source
