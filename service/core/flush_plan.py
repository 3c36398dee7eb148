"""Which fetched buffer records go into a flush, pure: duplicates, held copies,
unbuildable requests, the provider's size limits, enqueued tokens and today's budget.
Also the flush loop's small waits (an empty fetch, a budget block, a held copy's
keep-alive). Time is passed in; nothing here awaits."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from handlers import HandlerSpec
from service.core import fastjson, packing
from service.core.batchfile import custom_id, encode_line
from service.core.batching import take
from service.core.budget import seconds_until_next_day
from service.core.errors import BadItemError, EnrichError
from service.core.items import item_from_object
from service.core.packing import PackLimits
from service.core.tokens import estimate_request_tokens

Key = tuple[str, str]  # (handler, item id)


@dataclass(frozen=True)
class Encoded:
    """One record going into the flush: its line in the flush object, the size of its
    request line and its estimated prompt tokens."""

    index: int
    line: bytes
    size: int
    tokens: int


@dataclass
class FetchPlan:
    """The fetched records sorted, by index in the fetch, in fetch order."""

    send: list[Encoded] = field(default_factory=list)
    duplicates: list[int] = field(default_factory=list)  # the same intake message again: ack
    held: list[int] = field(default_factory=list)  # a copy of an item in flight: hold back
    unbuildable: list[tuple[int, EnrichError]] = field(default_factory=list)  # end with the error


def request_body(
    record: dict[str, Any], registry: Mapping[str, HandlerSpec], max_tokens_param: str
) -> dict[str, Any]:
    """The provider request of a buffered item, built at flush from the item (buffer
    records do not carry it: it would hold the item's text twice). Raises EnrichError when
    the handler is gone or its prompt names a field the item lacks."""
    spec = registry.get(record["handler"])
    if spec is None:
        raise BadItemError("unknown_handler", f"no handler named {record['handler']!r} any more")
    item = item_from_object(record["item"], record["handler"])
    return spec.build_body(item, max_tokens_param=max_tokens_param, steps=step_results(record))


def step_results(record: dict[str, Any]) -> dict[str, Any] | None:
    """A pipeline step's earlier results (``{steps.…}``), from its record's ``chain``."""
    chain = record.get("chain")
    if not chain:
        return None
    return {d["handler"]: d.get("result") for d in chain.get("done", ())}


def encode_for_flush(record: dict[str, Any]) -> tuple[bytes, int, int]:
    """A decoded buffer record's line in the flush object, the size of its request line
    and its estimated prompt tokens; its request body is dropped from ``record``."""
    body = record["body"]
    line = fastjson.dumps(record) + b"\n"
    size = len(encode_line(record["cid"], record["endpoint"], body))
    tokens = estimate_request_tokens(body)
    del record["body"]
    return line, size, tokens


def plan_fetch(
    records: list[dict[str, Any]],
    inflight: Mapping[Key, Any],
    *,
    registry: Mapping[str, HandlerSpec],
    max_tokens_param: str,
) -> FetchPlan:
    """Sort decoded buffer records (each gets its ``cid``). The same intake message
    buffered twice is sent once. Another record with the same (handler, id) as one in this
    flush, or as one in a flush still in flight (``inflight``), is held back: the provider
    is not paid twice for one item. Each request body is encoded as it is built and
    dropped: decoded, the bodies of a whole flush would be most of its memory."""
    plan = FetchPlan()
    seen: set[str] = set()
    keys: set[Key] = set()
    for index, r in enumerate(records):
        r["cid"] = custom_id(r["handler"], r["item"]["id"], r["intake_seq"])
        if r["cid"] in seen:
            plan.duplicates.append(index)
            continue
        key = (r["handler"], r["item"]["id"])
        if key in keys or key in inflight:
            plan.held.append(index)
            continue
        if "body" not in r:
            try:
                r["body"] = request_body(r, registry, max_tokens_param)
                # the answer is that definition's (CONTRACT §13), whatever changes later
                r["handler_version"] = registry[r["handler"]].version
            except EnrichError as exc:  # the handler changed since the item was buffered
                plan.unbuildable.append((index, exc))
                continue
        seen.add(r["cid"])
        keys.add(key)
        plan.send.append(Encoded(index, *encode_for_flush(r)))
    return plan


PACK_FIELDS = ("pack", "pack_key", "pack_n", "pack_weight")


def pack_lines(
    records: list[dict[str, Any]],
    lines: list[bytes],
    registry: Mapping[str, HandlerSpec],
    *,
    limits: PackLimits,
    max_tokens_param: str,
) -> tuple[list[bytes], int]:
    """A flush's lines with its packs (CONTRACT §12): records of a handler with
    ``pack > 1`` are grouped, in order, into packs of as many as fit
    (service/core/packing.py). Each member's line names its pack's ``custom_id``
    (``pack``), its key in the pack's prompt (``pack_key``), the pack's size (``pack_n``)
    and its prompt tokens (``pack_weight``, its share of the usage); the pack's first
    member also carries the pack's request body, the one line the batch file gets for the
    pack. The flush object so keeps which items are in which pack: results map back after
    a crash. Not packed: an item retried ``unpacked`` (its pack answer missed it), one
    whose kept request was built by another version of its handler, one whose text holds
    an item tag. Returns the lines and how many lines the batch file will have."""
    out = list(lines)
    by_handler: dict[str, list[int]] = {}
    for index, r in enumerate(records):
        spec = registry.get(r["handler"])
        if spec is None or spec.pack < 2 or r.get("unpacked") or r.get("handler_version") != spec.version:
            continue
        by_handler.setdefault(r["handler"], []).append(index)
    requests = len(records)
    for handler, indices in by_handler.items():
        spec = registry[handler]
        blocks: list[str] = []
        entries: list[tuple[str, int | None]] = []
        for index in indices:
            r = records[index]
            try:
                block = packing.item_block(spec, item_from_object(r["item"], handler), step_results(r))
            except EnrichError:
                block = ""
            blocks.append(block)
            tokens = packing.block_tokens(block) if packing.packable_block(block) else None
            entries.append((r["item"]["id"], tokens))
        for group in packing.group(spec, entries, limits):
            if len(group) < 2:
                continue
            members = [indices[g] for g in group]
            keys = packing.pack_keys([records[m]["item"]["id"] for m in members])
            pack_cid = packing.pack_custom_id([records[m]["cid"] for m in members])
            body = packing.build_pack_body(
                spec,
                [(key, blocks[g]) for key, g in zip(keys, group, strict=True)],
                limits=limits,
                max_tokens_param=max_tokens_param,
            )
            for position, (m, g, key) in enumerate(zip(members, group, keys, strict=True)):
                line: dict[str, Any] = {
                    **records[m],
                    "pack": pack_cid,
                    "pack_key": key,
                    "pack_n": len(members),
                    "pack_weight": entries[g][1],
                }
                line.pop("body", None)
                if position == 0:
                    line["body"] = body
                out[m] = fastjson.dumps(line) + b"\n"
            requests -= len(members) - 1
    return out, requests


def fit(
    sizes: list[int], tokens: list[int], *, max_items: int, max_bytes: int, max_enqueued_tokens: int | None
) -> int:
    """How many leading records fit one batch: provider limits, then enqueued tokens."""
    n = take([x + 8 for x in sizes], max_items=max_items, max_bytes=max_bytes)
    if not max_enqueued_tokens:
        return n
    total, count = 0, 0
    for t in tokens[:n]:
        if count and total + t > max_enqueued_tokens:
            break
        total += t
        count += 1
    return count


def budget_cut(costs: list[tuple[str, float]], room: Mapping[str, float | None]) -> int:
    """How many leading ``(handler, ceiling usd)`` records today's budget can still pay
    for; ``room`` is what is left per handler (None: no cap)."""
    left = dict(room)
    for index, (handler, usd) in enumerate(costs):
        have = left.get(handler)
        if have is None:
            continue
        if usd > have:
            return index
        left[handler] = have - usd
    return len(costs)


def flush_id(seqs: list[int], subject: str, *, with_last: bool = False) -> str:
    """A flush is named by its first buffer sequence: a re-run after a crash finds it.
    ``with_last`` adds the last one, for a fetch whose first message an earlier flush
    left in the buffer (an item being promoted, CONTRACT §11): that earlier flush holds
    the first name, and none of these messages."""
    token = subject.rsplit(".", 1)[-1]
    name = f"f{min(seqs)}-{max(seqs)}-{token}" if with_last else f"f{min(seqs)}-{token}"
    return name[:120]


def empty_fetch_wait_s(empty_fetches: int, poll_interval_s: float) -> float:
    """The stream counts messages no fetch gets (held elsewhere, NAKed with a delay):
    look again later, backing off, instead of spinning."""
    return min(max(5.0, poll_interval_s), 0.25 * 2.0 ** min(empty_fetches, 8))


def budget_wait_s(recheck_s: float, now: datetime) -> float:
    """How long a buffer the budget turned away waits: a recheck, or the day's turn."""
    return min(recheck_s, seconds_until_next_day(now))


def keep_alive_due(touched: float, now: float, ack_wait_s: float) -> bool:
    """A held copy wants ``in_progress`` every third of the buffer's ack wait."""
    return now - touched >= ack_wait_s / 3
