"""docs/asyncapi.json is what ``python -m service.asyncapi`` generates, and its schemas
accept the payloads the daemon really builds (and reject the items it really rejects)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from service.contract import schemas
from service.contract.asyncapi import build_document, render
from service.contract.subjects import Subjects
from service.core.budget import exceeded_events
from service.core.cost import Usage
from service.core.errors import BadItemError, ErrorInfo
from service.core.events import Outcome, dlq_entry, iso, result_event
from service.core.items import parse_item

ROOT = Path(__file__).resolve().parents[2]
COMMITTED = ROOT / "docs" / "asyncapi.json"
REGENERATE = ".venv/bin/python -m service.asyncapi --out docs/asyncapi.json"
DOC_URI = "urn:enrichd:asyncapi"
# CONTRACT §1: the lifecycle topics on enrich.events.<topic>.
CONTRACT_TOPICS = {
    "batch.submitted",
    "batch.completed",
    "batch.failed",
    "batch.expired",
    "batch.cancelled",
    "budget.exceeded",
    "alert",
    "file.done",
    "digest.closed",
    "digest.failed",
    "digest.skipped",
}
T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
T1 = datetime(2026, 11, 22, 10, 41, 7, tzinfo=UTC)


@pytest.fixture(scope="module")
def doc() -> dict[str, Any]:
    return build_document()


def validator(doc: dict[str, Any], schema_name: str) -> Draft202012Validator:
    """A validator for ``#/components/schemas/<name>`` with the document's $refs resolvable."""
    registry: Registry[Any] = Registry().with_resource(
        DOC_URI, Resource.from_contents(doc, default_specification=DRAFT202012)
    )
    return Draft202012Validator({"$ref": f"{DOC_URI}#/components/schemas/{schema_name}"}, registry=registry)


def assert_valid(doc: dict[str, Any], schema_name: str, payload: dict[str, Any]) -> None:
    # Through JSON, as on the wire.
    wire = json.loads(json.dumps(payload))
    errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator(doc, schema_name).iter_errors(wire)]
    assert not errors, f"{schema_name} rejects {wire}: {errors}"


def payload_schema(doc: dict[str, Any], channel: str) -> str:
    """The components/schemas name of the (single) message on ``channel``."""
    (message_ref,) = doc["channels"][channel]["messages"].values()
    message = doc["components"]["messages"][message_ref["$ref"].rsplit("/", 1)[-1]]
    ref: str = message["payload"]["$ref"]
    return ref.rsplit("/", 1)[-1]


# -- the committed file --------------------------------------------------------------------


def test_committed_document_is_up_to_date(doc: dict[str, Any]) -> None:
    assert COMMITTED.exists(), f"docs/asyncapi.json is missing; generate it with: {REGENERATE}"
    assert COMMITTED.read_text(encoding="utf-8") == render(doc), (
        f"docs/asyncapi.json is stale (schemas or subjects changed); regenerate it with: {REGENERATE}"
    )


def test_document_is_asyncapi_3(doc: dict[str, Any]) -> None:
    assert doc["asyncapi"] == "3.0.0"
    assert doc["info"]["title"] == "enrichd"
    for name, op in doc["operations"].items():
        assert op["channel"]["$ref"] == f"#/channels/{name}"


def test_every_contract_subject_is_documented(doc: dict[str, Any]) -> None:
    s = Subjects()
    addresses = {ch["address"]: name for name, ch in doc["channels"].items()}
    assert addresses[s.intake_prefix + "{handler}"] == "in"
    assert addresses[s.sync_prefix + "{handler}"] == "sync"
    assert addresses[s.out("{handler}")] == "out"
    assert addresses[s.dlq("{handler}")] == "dlq"
    assert set(schemas.LIFECYCLE_EVENTS) == CONTRACT_TOPICS
    for topic in CONTRACT_TOPICS:
        assert s.event(topic) in addresses, topic
    assert doc["operations"]["in"]["action"] == "receive"
    assert doc["operations"]["out"]["action"] == "send"
    reply = doc["operations"]["sync"]["reply"]["messages"][0]["$ref"].rsplit("/", 1)[-1]
    assert doc["components"]["messages"][reply]["payload"]["$ref"].endswith("/ResultEvent")
    assert payload_schema(doc, "in") == payload_schema(doc, "sync") == "Item"
    assert payload_schema(doc, "out") == "ResultEvent"
    assert payload_schema(doc, "dlq") == "DlqEntry"


def test_another_prefix_changes_subjects_not_schemas(doc: dict[str, Any]) -> None:
    other = build_document(Subjects("acme.enrich"))
    assert other["channels"]["out"]["address"] == "acme.enrich.out.{handler}"
    assert "ACME_ENRICH_OUT" in other["channels"]["out"]["description"]
    assert other["components"]["schemas"] == doc["components"]["schemas"]


# -- real payloads against the schemas -------------------------------------------------------


def outcome(**kw: Any) -> Outcome:
    base: dict[str, Any] = {
        "id": "msg-2026-11-22-0042",
        "handler": "summarize",
        "route": "batch",
        "model": "gpt-4o-mini",
        "received_at": T0,
        "completed_at": T1,
    }
    return Outcome(**(base | kw))


RESULT_EVENTS = {
    "ok-object": outcome(
        result={"summary": "s"},
        batch_id="batch_abc123",
        attempts=1,
        usage=Usage(412, 57),
        cost_usd=0.0000481,
        metadata={"mailbox": "ops"},
        source="email",
    ),
    "ok-text": outcome(route="sync", result="a gist", attempts=1, usage=Usage(10, 3), cost_usd=0.0001),
    "ok-embed": outcome(handler="embed", result={"embedding": [0.1, -0.2], "dimensions": 2}, attempts=1),
    "ok-cached": outcome(result={"summary": "s"}, cached=True),
    "error": outcome(
        route="sync",
        model=None,
        error=ErrorInfo("invalid_json", "body is not JSON", False),
        last_message="ignored",
    ),
}


@pytest.mark.parametrize("name", sorted(RESULT_EVENTS))
def test_result_events_match_schema(doc: dict[str, Any], name: str) -> None:
    event = result_event(RESULT_EVENTS[name])
    assert_valid(doc, "ResultEvent", event)
    schemas.ResultEvent.model_validate(event)


def test_result_event_without_a_key_is_rejected(doc: dict[str, Any]) -> None:
    event = result_event(RESULT_EVENTS["ok-text"])
    del event["cached"]
    assert list(validator(doc, "ResultEvent").iter_errors(event))


DLQ_ENTRIES = {
    "item": {
        "item": {"id": "a1", "text": "hello", "priority": "normal"},
        "raw": None,
        "last_provider_message": "Invalid schema",
    },
    "raw": {"item": None, "raw": b"\xffnot json"},
}


@pytest.mark.parametrize("name", sorted(DLQ_ENTRIES))
def test_dlq_entries_match_schema(doc: dict[str, Any], name: str) -> None:
    entry = dlq_entry(
        id="a1",
        handler="summarize",
        error=ErrorInfo("invalid_output", "not valid against the schema", False),
        attempts=2,
        subject="enrich.in.summarize",
        failed_at=T1,
        **DLQ_ENTRIES[name],
    )
    assert_valid(doc, "DlqEntry", entry)


def _batch_record() -> Any:
    from service.state.batches import BatchRecord

    return BatchRecord(
        flush_id="f-1",
        endpoint="/v1/chat/completions",
        model="gpt-4o-mini",
        provider="openai",
        state="published",
        created_at=0.0,
        count=3,
        size_bytes=900,
        tokens=1200,
        buffer_ranges=[[1, 3]],
        owner="r1",
        lease_until=0.0,
        batch_id="batch_abc123",
        provider_status="completed",
        request_counts={"total": 3, "completed": 2, "failed": 1},
    )


def test_batch_events_match_schema(doc: dict[str, Any]) -> None:
    # The body is the record's event_body, extended with counts (published batches) or a
    # reason (a flush to resubmit); see batcher.py.
    body = _batch_record().event_body(iso(T1))
    counts = {"ok": 2, "error": 1, "retried": 0}
    assert_valid(doc, "BatchEvent", body)
    for topic in ("batch.completed", "batch.expired", "batch.cancelled", "batch.failed"):
        name = schemas.LIFECYCLE_EVENTS[topic].__name__
        assert_valid(doc, name, body | counts)
    assert_valid(doc, "BatchFailedEvent", body | {"reason": "token_limit_exceeded"})
    assert list(validator(doc, "BatchFinishedEvent").iter_errors(body)), "counts are required"


def test_budget_events_match_schema(doc: dict[str, Any]) -> None:
    # What Daemon._budget_exceeded publishes (the integration test in test_budget.py reads
    # them off the stream).
    body, alert = exceeded_events(
        day="20261122", scope="all", cap_usd=5.0, spent_usd=5.0000001, at=iso(T1), instance="host-1"
    )
    assert_valid(doc, "BudgetExceededEvent", body)
    assert_valid(doc, "AlertEvent", alert)


# -- the item schema agrees with the parser --------------------------------------------------

ITEMS: list[tuple[str, Any, bool]] = [
    ("contract example", schemas.Item.model_config["json_schema_extra"]["examples"][0], True),  # type: ignore[index]
    ("text only", {"text": "x"}, True),
    ("nulls for optional keys", {"text": "x", "id": None, "fields": None, "metadata": None}, True),
    ("missing text", {"fields": {"a": "b"}}, False),
    ("text not a string", {"text": 5}, False),
    ("blank text", {"text": " \n\t"}, False),
    ("unknown key", {"text": "x", "colour": "red"}, False),
    ("bad id", {"text": "x", "id": "has space"}, False),
    ("id too long", {"text": "x", "id": "a" * 129}, False),
    ("id at the limit", {"text": "x", "id": "a" * 128}, True),
    ("bad priority", {"text": "x", "priority": "asap"}, False),
    ("null priority", {"text": "x", "priority": None}, False),
    ("field not a string", {"text": "x", "fields": {"n": 1}}, False),
    ("metadata not an object", {"text": "x", "metadata": [1]}, False),
    ("source not a string", {"text": "x", "source": 1}, False),
    ("deadline with zone", {"text": "x", "deadline": "2026-11-23T09:00:00+01:00"}, True),
]


@pytest.mark.parametrize(("name", "item", "accepted"), ITEMS, ids=[i[0] for i in ITEMS])
def test_item_schema_agrees_with_parser(doc: dict[str, Any], name: str, item: Any, accepted: bool) -> None:
    schema_ok = validator(doc, "Item").is_valid(item)
    try:
        parse_item(json.dumps(item).encode(), "summarize", max_bytes=1 << 20)
        parser_ok = True
    except BadItemError:
        parser_ok = False
    assert (schema_ok, parser_ok) == (accepted, accepted)
