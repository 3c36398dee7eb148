"""The pure flush plan (service.core.flush_plan): which fetched buffer records go into a
flush, which are duplicates or held back, how many fit, and the flush loop's waits.
Table-driven, time passed in."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from handlers import build_registry
from service.core.batchfile import custom_id
from service.core.flush_plan import (
    budget_cut,
    budget_wait_s,
    empty_fetch_wait_s,
    fit,
    flush_id,
    keep_alive_due,
    plan_fetch,
)

REG = build_registry({}, chat_model="m", embedding_model="e")


def rec(item_id: str, seq: int, handler: str = "tags", **item: Any) -> dict[str, Any]:
    return {
        "handler": handler,
        "item": {"id": item_id, "text": f"text of {item_id}", "priority": "normal", **item},
        "endpoint": "/v1/chat/completions",
        "model": "m",
        "received_at": "2026-11-22T10:00:00.000Z",
        "intake_seq": seq,
    }


def plan(records: list[dict[str, Any]], inflight: dict[tuple[str, str], str] | None = None) -> dict[str, Any]:
    p = plan_fetch(records, inflight or {}, registry=REG, max_tokens_param="max_completion_tokens")
    return {
        "send": [e.index for e in p.send],
        "duplicates": p.duplicates,
        "held": p.held,
        "unbuildable": [(i, exc.code) for i, exc in p.unbuildable],
    }


@pytest.mark.parametrize(
    ("records", "inflight", "expected"),
    [
        ([rec("a", 1), rec("b", 2)], {}, {"send": [0, 1], "duplicates": [], "held": [], "unbuildable": []}),
        # the same intake message buffered twice: sent once, the copy acked
        ([rec("a", 1), rec("a", 1)], {}, {"send": [0], "duplicates": [1], "held": [], "unbuildable": []}),
        # another message for the same item in this flush: held back
        ([rec("a", 1), rec("a", 2)], {}, {"send": [0], "duplicates": [], "held": [1], "unbuildable": []}),
        # an item already in flight in this replica: held back
        (
            [rec("a", 3), rec("b", 4)],
            {("tags", "a"): "f1-x"},
            {"send": [1], "duplicates": [], "held": [0], "unbuildable": []},
        ),
        # the same id for another handler is another item
        (
            [rec("a", 1), rec("a", 2, "summarize")],
            {},
            {"send": [0, 1], "duplicates": [], "held": [], "unbuildable": []},
        ),
        # the handler was removed since the item was buffered
        (
            [rec("a", 1, "gone"), rec("b", 2)],
            {},
            {"send": [1], "duplicates": [], "held": [], "unbuildable": [(0, "unknown_handler")]},
        ),
        # an unbuildable record does not hold back a later copy of its item
        (
            [rec("a", 1, "gone"), rec("a", 2, "gone")],
            {},
            {
                "send": [],
                "duplicates": [],
                "held": [],
                "unbuildable": [(0, "unknown_handler"), (1, "unknown_handler")],
            },
        ),
    ],
)
def test_plan_fetch_sorts_records(
    records: list[dict[str, Any]], inflight: dict[tuple[str, str], str], expected: dict[str, Any]
) -> None:
    assert plan(records, inflight) == expected


def test_plan_fetch_encodes_and_drops_bodies() -> None:
    records = [rec("a", 1), rec("b", 2)]
    p = plan_fetch(records, {}, registry=REG, max_tokens_param="max_completion_tokens")
    assert [r["cid"] for r in records] == [custom_id("tags", "a", 1), custom_id("tags", "b", 2)]
    assert all("body" not in r for r in records)  # only the encoded line keeps the request
    for encoded in p.send:
        assert encoded.line.endswith(b"\n") and b'"body"' in encoded.line
        assert encoded.size > 0 and encoded.tokens > 0


@pytest.mark.parametrize(
    ("sizes", "tokens", "max_items", "max_bytes", "max_enqueued", "expected"),
    [
        ([10, 10, 10], [5, 5, 5], 10, 1000, None, 3),
        ([10, 10, 10], [5, 5, 5], 2, 1000, None, 2),  # max items
        ([10, 10, 10], [5, 5, 5], 10, 36, None, 2),  # max bytes (each line + 8)
        ([5000], [5], 10, 100, None, 1),  # at least one, however large
        ([10, 10, 10], [5, 5, 5], 10, 1000, 10, 2),  # enqueued tokens
        ([10, 10], [50, 5], 10, 1000, 10, 1),  # the first one goes even over the limit
        ([10, 10, 10], [5, 5, 5], 10, 1000, 0, 3),  # 0: no limit
    ],
)
def test_fit(
    sizes: list[int],
    tokens: list[int],
    max_items: int,
    max_bytes: int,
    max_enqueued: int | None,
    expected: int,
) -> None:
    got = fit(sizes, tokens, max_items=max_items, max_bytes=max_bytes, max_enqueued_tokens=max_enqueued)
    assert got == expected


@pytest.mark.parametrize(
    ("costs", "room", "expected"),
    [
        ([("a", 1.0), ("a", 1.0)], {"a": None}, 2),  # no cap
        ([("a", 1.0), ("a", 1.0)], {"a": 5.0}, 2),
        ([("a", 1.0), ("a", 1.0), ("a", 1.0)], {"a": 2.5}, 2),  # cut where the room ends
        ([("a", 3.0)], {"a": 2.5}, 0),  # nothing fits
        ([("a", 1.0), ("b", 1.0), ("a", 1.0)], {"a": 1.5, "b": None}, 2),  # per handler
        ([("a", 1.0), ("b", 2.0)], {"a": 1.0, "b": 1.0}, 1),  # exactly the room fits
        ([], {}, 0),
    ],
)
def test_budget_cut(costs: list[tuple[str, float]], room: dict[str, float | None], expected: int) -> None:
    assert budget_cut(costs, room) == expected


def test_flush_id_is_named_by_first_sequence_and_buffer() -> None:
    assert flush_id([7, 3, 9], "enrich.buffer.openai_chat_m") == "f3-openai_chat_m"
    assert flush_id([7, 3, 9], "enrich.buffer.openai_chat_m", with_last=True) == "f3-9-openai_chat_m"
    assert len(flush_id([1], "x." + "t" * 300)) == 120


@pytest.mark.parametrize(
    ("empty", "poll_s", "expected"),
    [
        (1, 1.0, 0.5),
        (2, 1.0, 1.0),
        (4, 1.0, 4.0),
        (5, 1.0, 5.0),
        (20, 1.0, 5.0),
        (8, 30.0, 30.0),
        (20, 100.0, 64.0),
    ],
)
def test_empty_fetch_backoff(empty: int, poll_s: float, expected: float) -> None:
    assert empty_fetch_wait_s(empty, poll_s) == expected


@pytest.mark.parametrize(
    ("now", "recheck_s", "expected"),
    [
        (datetime(2026, 11, 22, 10, 0, tzinfo=UTC), 60.0, 60.0),
        (datetime(2026, 11, 22, 23, 59, 30, tzinfo=UTC), 60.0, 30.0),  # the day turns first
    ],
)
def test_budget_wait(now: datetime, recheck_s: float, expected: float) -> None:
    assert budget_wait_s(recheck_s, now) == expected


@pytest.mark.parametrize(
    ("touched", "now", "expected"), [(100.0, 100.0, False), (100.0, 139.9, False), (100.0, 140.0, True)]
)
def test_keep_alive_due_every_third_of_the_ack_wait(touched: float, now: float, expected: bool) -> None:
    assert keep_alive_due(touched, now, 120.0) is expected
