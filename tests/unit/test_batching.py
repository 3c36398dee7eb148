"""Batching policy, flush windows, batch-file encoding and decoding, and the per-item
actions of a finished batch: pure, table-driven, time passed in."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest

from handlers import build_registry
from service.core.batch_info import BatchError, BatchInfo
from service.core.batch_outcomes import Fail, Ok, Retry, completed_batch_actions, failed_batch_actions
from service.core.batchfile import LineFailed, LineOk, custom_id, parse_lines, to_jsonl
from service.core.batching import (
    BatchPolicy,
    BufferState,
    Window,
    WindowError,
    flush_reason,
    next_window_start,
    take,
    until_next_check,
)

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)  # a Sunday


@pytest.mark.parametrize(
    ("state", "expected"),
    [
        (BufferState(0, 0, None), None),
        (BufferState(99, 1000, NOW), None),
        (BufferState(100, 1000, NOW), "max_items"),
        (BufferState(5, 10_000, NOW), "max_bytes"),
        (BufferState(5, 10, NOW - timedelta(seconds=60)), "max_wait_s"),
        (BufferState(5, 10, NOW - timedelta(seconds=59)), None),
    ],
)
def test_flush_on_first_threshold(state: BufferState, expected: str | None) -> None:
    policy = BatchPolicy(max_items=100, max_bytes=10_000, max_wait_s=60)
    assert flush_reason(policy, state, NOW) == expected


def test_windows_gate_every_reason() -> None:
    night = BatchPolicy(max_items=10, max_wait_s=1, windows=(Window.parse("* 0-6 * * *"),))
    full = BufferState(10, 100, NOW - timedelta(hours=1))
    assert flush_reason(night, full, NOW) is None
    assert flush_reason(night, full, NOW.replace(hour=3)) == "max_items"
    assert next_window_start(list(night.windows), NOW) == datetime(2026, 11, 23, 0, 0, tzinfo=UTC)


@pytest.mark.parametrize(
    ("expr", "ts", "inside"),
    [
        ("*/15 * * * *", NOW.replace(minute=30), True),
        ("*/15 * * * *", NOW.replace(minute=31), False),
        ("0 22-23,0-5 * * 1-5", NOW.replace(hour=23, minute=0), False),  # Sunday
        ("0 22-23,0-5 * * 0", NOW.replace(hour=23, minute=0), True),
        ("* * 22 11 *", NOW, True),
    ],
)
def test_window_matching(expr: str, ts: datetime, inside: bool) -> None:
    assert Window.parse(expr).contains(ts) is inside


@pytest.mark.parametrize("expr", ["* * *", "61 * * * *", "a * * * *", "*/0 * * * *", "5-1 * * * *"])
def test_bad_windows(expr: str) -> None:
    with pytest.raises(WindowError):
        Window.parse(expr)


def test_until_next_check_is_bounded() -> None:
    policy = BatchPolicy(max_wait_s=600)
    assert until_next_check(policy, BufferState(0, 0, None), NOW) == 5.0
    assert until_next_check(policy, BufferState(1, 1, NOW - timedelta(seconds=599.5)), NOW) == pytest.approx(
        0.5
    )


@pytest.mark.parametrize(
    ("sizes", "max_items", "max_bytes", "expected"),
    [
        ([10] * 5, 3, 1000, 3),
        ([10] * 5, 10, 25, 2),
        ([100], 10, 50, 1),  # one oversize line still goes alone rather than never
        ([], 10, 10, 0),
    ],
)
def test_take_respects_both_limits(sizes: list[int], max_items: int, max_bytes: int, expected: int) -> None:
    assert take(sizes, max_items=max_items, max_bytes=max_bytes) == expected


def test_policy_refuses_provider_breaking_limits() -> None:
    with pytest.raises(ValueError):
        BatchPolicy(max_items=50_001)
    with pytest.raises(ValueError):
        BatchPolicy(max_bytes=200_000_001)


def test_custom_ids_are_portable_and_stable() -> None:
    a = custom_id("tags", "msg:1.x", 7)
    assert a == custom_id("tags", "msg:1.x", 7) != custom_id("tags", "msg:1.x", 8)
    assert len(a) <= 64 and a.replace("_", "").replace("-", "").isalnum()


def test_jsonl_and_output_parsing_in_any_order() -> None:
    data = to_jsonl([("i1", {"model": "m"}), ("i2", {"model": "m"})], url="/v1/chat/completions")
    lines = [json.loads(x) for x in data.splitlines()]
    assert lines[0] == {
        "custom_id": "i1",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m"},
    }
    assert not data.startswith(b"\xef\xbb\xbf")
    output = (
        "\n".join(
            json.dumps(x)
            for x in [
                {"custom_id": "i2", "response": {"status_code": 200, "body": {"ok": 2}}, "error": None},
                {
                    "custom_id": "i1",
                    "response": {"status_code": 500, "body": {"error": {"message": "boom"}}},
                    "error": None,
                },
                {"custom_id": "i3", "response": None, "error": {"code": "batch_expired", "message": "late"}},
                {
                    "custom_id": "i4",
                    "response": {
                        "status_code": 400,
                        "body": {"error": {"code": "context_length_exceeded", "message": "too long"}},
                    },
                    "error": None,
                },
            ]
        ).encode()
        + b"\n\n"
    )
    # split inside a line to show lines may span chunks
    parsed = dict(parse_lines([output[:37], output[37:]]))
    assert parsed["i2"] == LineOk({"ok": 2})
    assert isinstance(parsed["i1"], LineFailed) and parsed["i1"].error.code == "provider_error"
    assert parsed["i1"].error.retryable
    assert isinstance(parsed["i3"], LineFailed) and parsed["i3"].error.code == "batch_expired"
    assert isinstance(parsed["i4"], LineFailed) and parsed["i4"].error.code == "context_length_exceeded"
    assert not parsed["i4"].error.retryable


REG = build_registry({}, chat_model="m", embedding_model="e")


def _item(cid: str, attempts: int = 0) -> dict:
    return {"cid": cid, "handler": "sentiment", "batch_attempts": attempts}


def _ok_body(content: str) -> dict:
    return {
        "choices": [{"message": {"content": content}, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2},
    }


def test_actions_of_a_completed_batch() -> None:
    from service.core.errors import ProviderError

    items = [_item("a"), _item("b"), _item("c"), _item("d", attempts=4), _item("e")]
    lines = {
        "a": LineOk(_ok_body('{"sentiment": "neutral", "score": 0}')),
        "b": LineOk(_ok_body("not json")),
        "c": LineFailed(ProviderError("provider_error", "boom", retryable=True)),
        "d": LineFailed(ProviderError("provider_error", "boom", retryable=True)),
    }
    actions = completed_batch_actions(items, lines, REG, status="completed", max_attempts=5)
    assert isinstance(actions[0], Ok) and actions[0].usage.input_tokens == 3
    assert isinstance(actions[1], Retry)  # invalid output: one more try
    assert isinstance(actions[2], Retry)
    assert isinstance(actions[3], Fail) and actions[3].error.retryable  # out of attempts
    assert isinstance(actions[4], Retry)  # no line at all
    cancelled = completed_batch_actions(items, lines, REG, status="cancelled", max_attempts=5)
    assert isinstance(cancelled[0], Ok)
    assert isinstance(cancelled[4], Fail) and cancelled[4].error.code == "batch_cancelled"


def test_actions_of_a_batch_that_failed_validation() -> None:
    info = BatchInfo(
        id="b",
        status="failed",
        created_at=0,
        output_file_id=None,
        error_file_id=None,
        request_counts={},
        errors=[BatchError("invalid_json_line", "bad line", 2)],
    )
    actions = failed_batch_actions(info, 3)
    assert isinstance(actions[0], Retry) and isinstance(actions[2], Retry)
    assert isinstance(actions[1], Fail) and actions[1].error.code == "bad_request"
