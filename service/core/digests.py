"""Digests (CONTRACT §15), pure: a window's members and groups, the digest handler's
fields, the ids that make a digest exactly-once, the hierarchical reduction's plan and the
digest event.

A window's members are the ``ok`` result events of the source whose JetStream time is in
``[start, end)``, one per item id (the last one wins), in stream order. With ``group_by``
they are split by the value at that path of the event; without, there is one group
(``None``)."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.core import fastjson
from service.core.events import Outcome, iso, result_event

# The fields a digest handler's template may name (besides ``text``, the same as items).
FIELDS = ("items", "count", "window_start", "window_end", "group")
# Tokens kept free in each call besides the prompt and the answer (chat framing, estimate error).
MARGIN_TOKENS = 64
MAX_LEVELS = 8


@dataclass(frozen=True)
class Member:
    """One member: its item id, group and its line in ``{items}``."""

    id: str
    group: str | None
    line: str


def members(events: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """The ``ok`` events, one per id (the last one in the window), in stream order of that last one."""
    last: dict[str, dict[str, Any]] = {}
    for event in events:
        if event.get("status") != "ok" or not isinstance(event.get("id"), str):
            continue
        last.pop(event["id"], None)  # re-inserted at the end: the order of the one kept
        last[event["id"]] = event
    return list(last.values())


def group_of(event: dict[str, Any], path: Sequence[str] | None) -> str | None:
    """The value at ``path`` as text (objects as compact JSON); None when absent or null."""
    if path is None:
        return None
    value: Any = event
    for part in path:
        if not isinstance(value, dict):
            return None
        value = value.get(part)
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | int | float):
        return str(value)
    return fastjson.dumps(value).decode()


def as_text(result: Any) -> str:
    """A result on one line: a text result as is, a structured one as compact JSON."""
    text = result if isinstance(result, str) else fastjson.dumps(result).decode()
    return " ".join(text.split())


def member_line(event: dict[str, Any]) -> str:
    return f"[{event['id']}] {as_text(event.get('result'))}"


def split_groups(
    events: Iterable[dict[str, Any]], path: Sequence[str] | None
) -> dict[str | None, list[Member]]:
    """Members by group, the groups sorted (no value first), members in stream order."""
    groups: dict[str | None, list[Member]] = {}
    for event in members(events):
        group = group_of(event, path)
        groups.setdefault(group, []).append(Member(event["id"], group, member_line(event)))
    return dict(sorted(groups.items(), key=lambda kv: (kv[0] is not None, kv[0] or "")))


def group_token(group: str | None) -> str:
    """A group as a token safe in ids, KV keys and subjects: ``all`` for no group."""
    if group is None:
        return "all"
    return "g" + hashlib.sha256(group.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def event_id(digest: str, start: datetime, group: str | None) -> str:
    """The digest event's ``id``: ``<digest>.<window start, Unix s>.<group token>``."""
    return f"{digest}.{int(start.timestamp())}.{group_token(group)}"


def digest_msg_id(digest: str, start: datetime, group: str | None) -> str:
    """``Nats-Msg-Id`` of the digest event: a re-publish after a crash is dropped."""
    return f"{digest}:{iso(start)}:{group_token(group)}"


def call_id(digest: str, start: datetime, group: str | None, level: int, index: int) -> str:
    """The result-store id of one call of the reduction: a finished call is never paid again."""
    return f"{event_id(digest, start, group)}.L{level}.C{index}"


def fields(
    lines: Sequence[str], *, count: int, start: datetime, end: datetime, group: str | None
) -> dict[str, str]:
    """The digest handler's template fields (``text`` is set to ``items`` by the caller)."""
    return {
        "items": "\n".join(lines),
        "count": str(count),
        "window_start": iso(start),
        "window_end": iso(end),
        "group": group or "",
    }


def plan_chunks(sizes: Sequence[int], budget: int) -> list[list[int]]:
    """Consecutive lines (by token size, newline included) into chunks of at most
    ``budget`` tokens, in order; a line larger than the budget is a chunk alone (the
    caller cuts it first). One chunk: everything fits one call."""
    chunks: list[list[int]] = []
    used = 0
    for index, size in enumerate(sizes):
        if chunks and used + size <= budget:
            chunks[-1].append(index)
            used += size
        else:
            chunks.append([index])
            used = size
    return chunks


def cut_line(line: str, budget: int, count: Callable[[str], int]) -> str:
    """``line`` shortened (with an ellipsis) to at most ``budget`` tokens."""
    size = count(line)
    if size <= budget:
        return line
    keep = len(line)
    for _ in range(12):
        keep = max(0, min(keep - 1, int(keep * budget / max(size, 1) * 0.95)))
        cut = line[:keep] + " ..."
        size = count(cut)
        if size <= budget:
            return cut
    return line[: max(0, budget)] + " ..."


def part_line(index: int, total: int, covered: int, answer: Any) -> str:
    """A chunk's answer as a line of the next level."""
    return f"[part {index + 1} of {total}, {covered} items] {as_text(answer)}"


def digest_event(
    outcome: Outcome,
    *,
    start: datetime,
    end: datetime,
    group: str | None,
    member_ids: Sequence[str],
) -> dict[str, Any]:
    """The result event (CONTRACT §3 shape) with its ``digest`` descriptor."""
    event = result_event(outcome)
    event["digest"] = descriptor(start=start, end=end, group=group, member_ids=member_ids)
    return event


def descriptor(
    *, start: datetime, end: datetime, group: str | None, member_ids: Sequence[str]
) -> dict[str, Any]:
    return {
        "window_start": iso(start),
        "window_end": iso(end),
        "group": group,
        "members": len(member_ids),
        "member_ids": list(member_ids),
    }
