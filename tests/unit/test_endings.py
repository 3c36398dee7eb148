"""The one ending builder (service/core/endings.py), table-driven: ids, headers, DLQ."""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.core import endings
from service.core.cost import Usage
from service.core.errors import ErrorInfo
from service.core.events import Outcome
from service.core.items import Item

T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
ITEM = Item(
    id="a1",
    handler="tags",
    text="hello",
    fields={},
    priority="normal",
    deadline=None,
    metadata=None,
    source=None,
)
ERR = ErrorInfo("invalid_output", "no JSON", False)


def outcome(**kw: Any) -> Outcome:
    base: dict[str, Any] = {
        "id": "a1",
        "handler": "tags",
        "route": "sync",
        "model": "m",
        "received_at": T0,
        "completed_at": T0 + timedelta(seconds=2),
        "attempts": 1,
        "usage": Usage(10, 5),
    }
    return Outcome(**(base | kw))


def encode(obj: Any) -> bytes:
    return json.dumps(obj).encode()


CASES = [
    # name, outcome, intake_seq, request_id, header_on_error, msg_id, header_seq, dlq_msg_id
    ("ok", outcome(result={"tags": []}), 7, None, True, "a1:tags", 7, None),
    ("error", outcome(error=ERR), 7, None, True, "a1:tags:error:7", 7, "a1:tags:dlq:7"),
    (
        "error, batch style",
        outcome(error=ERR, route="batch"),
        7,
        None,
        False,
        "a1:tags:error:7",
        None,
        "a1:tags:dlq:7",
    ),
    ("sync request ok", outcome(result=1), None, None, True, "a1:tags", None, None),
    ("sync request error", outcome(error=ERR), None, "u1", True, "a1:tags", None, "a1:tags:dlq:sync-u1"),
]


@pytest.mark.parametrize(
    ("name", "out", "seq", "request_id", "on_error", "msg_id", "header_seq", "dlq_id"),
    CASES,
    ids=[c[0] for c in CASES],
)
def test_end(
    name: str,
    out: Outcome,
    seq: int | None,
    request_id: str | None,
    on_error: bool,
    msg_id: str,
    header_seq: int | None,
    dlq_id: str | None,
) -> None:
    ending = endings.end(
        out,
        intake_seq=seq,
        subject="p.in.tags",
        item=ITEM,
        raw=b"{}",
        encode=encode,
        max_dlq_bytes=10_000,
        request_id=request_id,
        header_on_error=on_error,
    )
    assert ending.msg_id == msg_id
    assert ending.header_seq == header_seq
    assert ending.dlq_msg_id == dlq_id
    assert ending.event["status"] == ("ok" if out.ok else "error")
    assert ending.headers.get(endings.INTAKE_SEQ_HEADER) == (None if header_seq is None else str(header_seq))
    if out.ok:
        assert ending.dlq_payload is None and ending.log_level == logging.DEBUG
    else:
        assert ending.log_level == logging.WARNING and ending.log_fields["error_code"] == "invalid_output"
        entry = json.loads(ending.dlq_payload or b"")
        assert entry["item"]["id"] == "a1" and entry["subject"] == "p.in.tags" and "raw" not in entry


def test_dlq_entry_keeps_the_raw_body_without_an_item() -> None:
    ending = endings.end(
        outcome(error=ERR),
        intake_seq=3,
        subject="s",
        item=None,
        raw=b"not json",
        encode=encode,
        max_dlq_bytes=10_000,
    )
    entry = json.loads(ending.dlq_payload or b"")
    assert entry["item"] is None and entry["raw"] == "not json"


def test_oversize_dlq_entry_is_fitted() -> None:
    big = Item(
        id="a1",
        handler="tags",
        text="x" * 50_000,
        fields={},
        priority="normal",
        deadline=None,
        metadata=None,
        source=None,
    )
    ending = endings.end(
        outcome(error=ERR), intake_seq=3, subject="s", item=big, raw=None, encode=encode, max_dlq_bytes=4_000
    )
    assert ending.dlq_payload is not None and len(ending.dlq_payload) <= 4_000
    entry = json.loads(ending.dlq_payload)
    assert entry["truncated"]["field"] == "item.text" and entry["truncated"]["chars"] == 50_000


def test_sync_request_error_needs_a_request_id() -> None:
    with pytest.raises(ValueError):
        endings.end(
            outcome(error=ERR),
            intake_seq=None,
            subject="s",
            item=ITEM,
            raw=None,
            encode=encode,
            max_dlq_bytes=1,
        )


STORED = {"id": "a1", "handler": "tags", "status": "ok", "cached": False, "cost_usd": 0.2, "attempts": 1}


@pytest.mark.parametrize(
    ("name", "stored_seq", "seq", "msg_id", "cached"),
    [
        ("redelivery of the message that stored it", 5, 5, "a1:tags", False),
        ("another message: cached copy", 5, 9, "a1:tags:cached:9", True),
        ("sync request: cached copy", 5, None, "a1:tags:cached:None", True),
    ],
)
def test_from_store(name: str, stored_seq: int, seq: int | None, msg_id: str, cached: bool) -> None:
    now = T0 + timedelta(seconds=9)
    ending = endings.from_store(
        STORED, stored_seq, intake_seq=seq, metadata={"k": 1}, source="src", received_at=T0, now=now
    )
    assert (ending.msg_id, ending.cached, ending.header_seq) == (msg_id, cached, seq)
    if cached:
        assert (
            ending.event["cached"] is True
            and ending.event["cost_usd"] == 0.0
            and ending.event["metadata"] == {"k": 1}
        )
    else:
        assert ending.event is STORED


def test_salvaged_outcome_prefers_the_parsed_item() -> None:
    err = ErrorInfo("unknown_handler", "no", False)
    from_raw = endings.salvaged_outcome(b'{"id": "r1", "source": "s"}', "nope", err, received_at=T0, now=T0)
    assert (from_raw.id, from_raw.source, from_raw.error) == ("r1", "s", err)
    from_item = endings.salvaged_outcome(b"{}", "tags", err, received_at=T0, now=T0, item=ITEM, attempts=3)
    assert (from_item.id, from_item.attempts, from_item.route) == ("a1", 3, "sync")
