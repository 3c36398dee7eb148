"""Item parsing: every bad-item code has a case, and good items keep what they carry."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from service.core.errors import BAD_ITEM_CODES, BadItemError
from service.core.items import default_id, parse_item, salvage

LIMIT = 4096


def parse(raw: bytes | str, handler: str = "summarize"):
    data = raw.encode() if isinstance(raw, str) else raw
    return parse_item(data, handler, max_bytes=LIMIT)


@pytest.mark.parametrize(
    ("raw", "code"),
    [
        (b"\xff\xfe\x00bad", "invalid_utf8"),
        ("{not json", "invalid_json"),
        ("[1, 2]", "not_an_object"),
        ('"just a string"', "not_an_object"),
        ("{}", "missing_text"),
        ('{"text": 42}', "invalid_text"),
        ('{"text": "   "}', "empty_text"),
        ('{"text": "x", "fields": {"a": 1}}', "invalid_fields"),
        ('{"text": "x", "fields": ["a"]}', "invalid_fields"),
        ('{"text": "x", "id": "has space"}', "invalid_id"),
        ('{"text": "x", "id": ""}', "invalid_id"),
        (json.dumps({"text": "x", "id": "a" * 129}), "invalid_id"),
        ('{"text": "x", "priority": "asap"}', "invalid_priority"),
        ('{"text": "x", "deadline": "tomorrow"}', "invalid_deadline"),
        ('{"text": "x", "deadline": "2026-11-23T09:00:00"}', "invalid_deadline"),
        ('{"text": "x", "metadata": "m"}', "invalid_metadata"),
        ('{"text": "x", "source": 7}', "invalid_source"),
        ('{"text": "x", "colour": "red"}', "unknown_field"),
        (json.dumps({"text": "x" * LIMIT}), "item_too_large"),
    ],
)
def test_bad_items_have_precise_codes(raw: bytes | str, code: str) -> None:
    with pytest.raises(BadItemError) as info:
        parse(raw)
    assert info.value.code == code
    assert code in BAD_ITEM_CODES
    assert info.value.retryable is False


def test_good_item_keeps_everything() -> None:
    item = parse(
        json.dumps(
            {
                "id": "msg-2026-11-22-0042",
                "text": "Invoice overdue",
                "fields": {"subject": "Invoice", "from": "ap@example.com"},
                "priority": "urgent",
                "deadline": "2026-11-23T09:00:00Z",
                "metadata": {"mailbox": "ops", "n": 3},
                "source": "email",
            }
        )
    )
    assert item.id == "msg-2026-11-22-0042"
    assert item.priority == "urgent"
    assert item.deadline == datetime(2026, 11, 23, 9, tzinfo=UTC)
    assert item.metadata == {"mailbox": "ops", "n": 3}
    assert item.to_dict()["deadline"] == "2026-11-23T09:00:00Z"


def test_default_id_is_content_hash_and_stable() -> None:
    a = parse('{"text": "same", "fields": {"b": "2", "a": "1"}}')
    b = parse('{"fields": {"a": "1", "b": "2"}, "text": "same"}')
    c = parse('{"text": "same"}', handler="tags")
    assert a.id == b.id == default_id("summarize", "same", {"a": "1", "b": "2"})
    assert len(a.id) == 64
    assert c.id != a.id
    assert a.priority == "normal"


def test_salvage_keeps_id_and_metadata_of_bad_items() -> None:
    assert salvage(b'{"id": "ok-1", "metadata": {"k": "v"}, "text": 5}') == ("ok-1", {"k": "v"}, None)
    item_id, meta, source = salvage(b"\xff")
    assert item_id.startswith("raw-") and meta is None and source is None


def test_every_error_code_is_documented() -> None:
    from pathlib import Path

    from service.core.errors import ALL_CODES

    doc = (Path(__file__).parents[2] / "docs" / "errors.md").read_text()
    for code in ALL_CODES:
        assert f"`{code}`" in doc, f"docs/errors.md does not document {code}"


def test_a_lone_surrogate_is_a_bad_item_in_text_and_fields_but_echoed_in_metadata() -> None:
    # A lone surrogate is legal in a JSON string escape, but it is not Unicode text: no
    # provider can read it, so in what the model reads it is the item's fault (not retryable).
    with pytest.raises(BadItemError) as err:
        parse_item(b'{"text": "a \\ud800 b"}', "tags", max_bytes=10_000)
    assert err.value.code == "invalid_text" and "surrogate" in err.value.message
    with pytest.raises(BadItemError) as err:
        parse_item(b'{"text": "x", "fields": {"t": "\\udfff"}}', "tags", max_bytes=10_000)
    assert err.value.code == "invalid_fields"
    paired = parse_item(b'{"text": "\\ud83d\\ude00 ok"}', "tags", max_bytes=10_000)  # a pair is fine
    assert paired.text == "\U0001f600 ok"
    echoed = parse_item(b'{"text": "x", "metadata": {"m": "\\ud800"}}', "tags", max_bytes=10_000)
    assert echoed.metadata == {"m": "\ud800"} and len(echoed.id) == 64


def test_an_integer_python_cannot_hold_is_invalid_json_and_salvage_never_raises() -> None:
    # Python refuses to convert integers of more than 4,300 digits (a ValueError that is
    # not a JSONDecodeError): it must end as a coded bad item, never escape as a crash.
    raw = b'{"id": "huge", "text": "x", "metadata": {"n": ' + b"7" * 5000 + b"}}"
    with pytest.raises(BadItemError) as err:
        parse_item(raw, "tags", max_bytes=100_000)
    assert err.value.code == "invalid_json" and "4300" in err.value.message
    assert salvage(raw)[0].startswith("raw-")
    big = parse_item(
        b'{"id": "n1", "text": "x", "metadata": {"n": 123456789012345678901234567890}}',
        "tags",
        max_bytes=10_000,
    )
    assert big.metadata == {"n": 123456789012345678901234567890}  # not rounded to a float


def test_nesting_too_deep_is_invalid_json_not_a_crash() -> None:
    raw = b'{"text": "x", "metadata": {"a": ' + b"[" * 5000 + b"]" * 5000 + b"}}"
    with pytest.raises(BadItemError) as err:
        parse_item(raw, "tags", max_bytes=100_000)
    assert err.value.code == "invalid_json"
    assert salvage(raw)[0].startswith("raw-")


def test_fastjson_round_trips_what_json_accepts() -> None:
    from service.core import fastjson

    for text in ['{"a":1.5e-05,"b":"é"}', '{"n":123456789012345678901234567890}', '{"s":"\\ud800"}', "[NaN]"]:
        value = fastjson.loads(text)
        again = json.loads(fastjson.dumps(value))  # strict JSON back out (NaN becomes null)
        expected = json.loads(text)
        if text == "[NaN]":
            assert again == [None]
        else:
            assert again == expected
    assert fastjson.dumps({1: "x"}) == b'{"1":"x"}'
    with pytest.raises(json.JSONDecodeError):
        fastjson.loads(b"{not json")
