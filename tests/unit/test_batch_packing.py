"""Packs on the batch route, pure: a flush's lines with packs (membership kept in the
flush object), the batch file lines they make, and the per-member actions of a pack's
output line (answers, unpacked retries, shares that add up)."""

from __future__ import annotations

import json
import re
from typing import Any

from handlers import build_registry
from service.core import fastjson
from service.core.batch_info import BatchError, BatchInfo
from service.core.batch_outcomes import (
    ActionCollector,
    Fail,
    Ok,
    Retry,
    failed_batch_actions,
    line_numbers,
    pack_actions,
)
from service.core.batchfile import LineFailed, LineOk
from service.core.cost import Usage
from service.core.errors import ProviderError
from service.core.flush_plan import pack_lines, plan_fetch
from service.core.packing import PackLimits

REG = build_registry({"tags": {"pack": 4}}, chat_model="m", embedding_model="e")
ITEM_RE = re.compile(r'<item id="([A-Za-z0-9._:-]{1,128})">\n(.*?)\n</item>', re.DOTALL)


def rec(item_id: str, seq: int, handler: str = "tags", **extra: Any) -> dict[str, Any]:
    return {
        "handler": handler,
        "item": {"id": item_id, "text": f"text of {item_id}", "priority": "normal"},
        "endpoint": "/v1/chat/completions",
        "model": "m",
        "received_at": "2026-11-22T10:00:00.000Z",
        "intake_seq": seq,
        **extra,
    }


def flush(records: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """What the flusher writes: planned records, then their lines with packs, decoded."""
    plan = plan_fetch(records, {}, registry=REG, max_tokens_param="max_completion_tokens")
    kept = [records[e.index] for e in plan.send]
    lines, requests = pack_lines(
        kept, [e.line for e in plan.send], REG, limits=PackLimits(), max_tokens_param="max_completion_tokens"
    )
    return [fastjson.loads(line) for line in lines], requests


def batch_lines(items: list[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
    """The batch file, as batch/submit.py writes it."""
    return [(it.get("pack") or it["cid"], it["body"]) for it in items if "body" in it]


def answer(keys: list[str], *, drop: int = 0, usage: tuple[int, int] = (300, 90)) -> LineOk:
    answers = [{"id": k, "result": {"tags": [f"t-{k}"]}} for k in keys][: len(keys) - drop]
    body = {
        "choices": [{"message": {"content": json.dumps({"answers": answers})}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]},
    }
    return LineOk(body)


def test_a_flush_packs_the_handler_that_packs_and_keeps_who_is_in_which_pack() -> None:
    records = [rec(f"a{i}", i) for i in range(10)] + [rec("s1", 20, "summarize"), rec("s2", 21, "summarize")]
    items, requests = flush(records)
    assert len(items) == 12
    lines = batch_lines(items)
    assert requests == len(lines) == 3 + 2  # 10 tags items in packs of 4, 4, 2; summarize alone
    packs = [it["pack"] for it in items if "pack" in it]
    assert len(packs) == 10 and len(set(packs)) == 3
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cid) for cid, _ in lines)
    first = items[0]
    assert first["pack_n"] == 4 and first["pack_key"] == "1" and first["pack_weight"] > 0
    body = first["body"]
    assert [k for k, _ in ITEM_RE.findall(body["messages"][1]["content"])] == ["1", "2", "3", "4"]
    assert all("body" not in it for it in items[1:4])  # the pack's line is its first member's
    assert all("pack" not in it and "body" in it for it in items[10:])
    assert line_numbers(items) == [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 3, 4]


def test_unpacked_and_old_version_records_go_alone() -> None:
    records = [rec("a", 1, unpacked=True), rec("b", 2), rec("c", 3)]
    items, requests = flush(records)
    assert requests == 2 and "pack" not in items[0] and items[1]["pack"] == items[2]["pack"]
    # a retried item whose kept request was built by an older handler definition
    old = rec("d", 4, body={"model": "m", "messages": []}, handler_version="000000000000")
    items, requests = flush([old, rec("e", 5), rec("f", 6)])
    assert requests == 2 and "pack" not in items[0] and items[0]["body"] == {"model": "m", "messages": []}


def test_pack_answers_map_back_to_members_with_shares_that_add_up() -> None:
    items, _ = flush([rec(f"a{i}", i) for i in range(4)])
    keys = [it["pack_key"] for it in items]
    actions = pack_actions(REG["tags"], items, answer(keys, drop=2), status="completed", max_attempts=5)
    assert [type(a) for a in actions] == [Ok, Ok, Retry, Retry]
    assert actions[0].result == {"tags": ["t-1"]} and actions[0].packed == 4
    assert all(a.unpacked for a in actions[2:] if isinstance(a, Retry))
    assert sum((a.usage for a in actions), Usage(0, 0)) == Usage(300, 90)
    # no attempts left: the members it missed end with the error
    last = [{**it, "batch_attempts": 4} for it in items]
    ends = pack_actions(REG["tags"], last, answer(keys, drop=1), status="completed", max_attempts=5)
    assert isinstance(ends[3], Fail) and ends[3].error.code == "invalid_output" and ends[3].packed == 4


def test_unreadable_or_rejected_pack_sends_every_member_alone() -> None:
    items, _ = flush([rec(f"a{i}", i) for i in range(3)])
    bad = LineOk({"choices": [{"message": {"content": "no json"}, "finish_reason": "stop"}], "usage": {}})
    assert all(
        isinstance(a, Retry) and a.unpacked
        for a in pack_actions(REG["tags"], items, bad, status="completed", max_attempts=5)
    )
    rejected = LineFailed(ProviderError("context_length_exceeded", "too long", retryable=False))
    assert all(
        isinstance(a, Retry) and a.unpacked
        for a in pack_actions(REG["tags"], items, rejected, status="completed", max_attempts=5)
    )
    # a line that did not run: a retry like any item's, packed again next time
    expired = LineFailed(ProviderError("batch_expired", "expired", retryable=True))
    again = pack_actions(REG["tags"], items, expired, status="expired", max_attempts=5)
    assert all(isinstance(a, Retry) and not a.unpacked for a in again)


def test_collector_maps_pack_lines_and_single_lines_whatever_the_order() -> None:
    items, _ = flush([rec(f"a{i}", i) for i in range(5)] + [rec("s", 9, "summarize")])
    lines = batch_lines(items)
    by_cid = dict(lines)
    pack_keys = {it["pack"]: [] for it in items if "pack" in it}
    for it in items:
        if "pack" in it:
            pack_keys[it["pack"]].append(it["pack_key"])
    handler_of = {it["cid"]: it["handler"] for it in items}
    outcomes: list[tuple[str, Any]] = []
    for cid in reversed(list(by_cid)):
        if cid in pack_keys:
            outcomes.append((cid, answer(pack_keys[cid])))
        else:
            result = {"summary": "a summary"} if handler_of[cid] == "summarize" else {"tags": ["x"]}
            content = json.dumps(result)
            body = {"choices": [{"message": {"content": content}, "finish_reason": "stop"}], "usage": {}}
            outcomes.append((cid, LineOk(body)))
    collector = ActionCollector(items, REG, status="completed", max_attempts=5)
    collector.add(outcomes)
    actions = collector.result()
    assert all(isinstance(a, Ok) for a in actions)
    assert [a.packed for a in actions if isinstance(a, Ok)] == [4, 4, 4, 4, 1, 1]  # a4 alone: a pack of one
    # a pack line that never came back: its members are retried (and packed again)
    missing = ActionCollector(items, REG, status="expired", max_attempts=5)
    missing.add([o for o in outcomes if o[0] not in pack_keys])
    assert [type(a) for a in missing.result()] == [Retry] * 4 + [Ok, Ok]


def test_failed_validation_names_lines_not_items() -> None:
    items, _ = flush([rec(f"a{i}", i) for i in range(5)])
    info = BatchInfo(
        id="b",
        status="failed",
        created_at=0,
        output_file_id=None,
        error_file_id=None,
        request_counts={},
        errors=[BatchError("invalid_json_line", "bad", 2)],
    )
    actions = failed_batch_actions(info, len(items), line_numbers(items))
    # line 2 is a4, alone; the pack on line 1 never ran
    assert [type(a) for a in actions] == [Retry, Retry, Retry, Retry, Fail]
