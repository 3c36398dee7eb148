"""Pipeline.prepare / buffer_now: an intake message is parsed once and the parsed result
travels on; the error order is size, handler, content, template."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from handlers import build_registry
from service.core.intake import BufferWrite, Intake, Prepared
from service.core.retry import RetryPolicy
from service.core.routing import RoutingRules
from service.pipeline.process import Pipeline, PipelineConfig

NOW = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


class Unused:
    """Ports that buffer_now must not touch (it does no I/O)."""

    def __getattr__(self, name: str) -> Any:
        raise AssertionError(f"no I/O expected, got {name}")


def pipeline(max_item_bytes: int = 10_000) -> Pipeline:
    config = PipelineConfig(
        registry=build_registry({}, chat_model="gpt-4o-mini", embedding_model="text-embedding-3-small"),
        rules=RoutingRules(sync_priorities=frozenset({"urgent", "high"}), max_latency_s=86_400),
        retry=RetryPolicy(max_attempts=3, base_s=0.1, max_backoff_s=1, max_elapsed_s=10),
        prices={},
        batch_discount=0.5,
        max_item_bytes=max_item_bytes,
    )
    return Pipeline(config, provider=Unused(), store=Unused(), sink=Unused(), clock=lambda: NOW)


def intake(raw: bytes, handler: str = "tags") -> Intake:
    return Intake(raw, handler, f"p.in.{handler}", NOW, seq=4)


@pytest.mark.parametrize(
    ("name", "raw", "handler", "code", "item_kept"),
    [
        ("too large", b'{"text": "' + b"x" * 20_000 + b'"}', "tags", "item_too_large", False),
        ("not JSON", b"{nope", "tags", "invalid_json", False),
        ("unknown handler, item parsed", b'{"id": "a", "text": "t"}', "nope", "unknown_handler", True),
        ("unknown handler wins over bad content", b'{"id": "a"}', "nope", "unknown_handler", False),
        ("bad content", b'{"id": "a"}', "tags", "missing_text", False),
    ],
)
def test_bad_items_come_back_parsed_with_their_error(
    name: str, raw: bytes, handler: str, code: str, item_kept: bool
) -> None:
    taken = pipeline().buffer_now(intake(raw, handler))
    assert isinstance(taken, Prepared)
    assert taken.error is not None and taken.error.code == code
    assert (taken.item is not None) == item_kept
    assert taken.body is None


def test_a_batch_routed_item_gets_its_buffer_message() -> None:
    taken = pipeline().buffer_now(intake(b'{"id": "a", "text": "hello"}'))
    assert isinstance(taken, BufferWrite)
    assert taken.msg_id == "tags:a:4" and taken.handler == "tags"


def test_a_sync_routed_item_comes_back_parsed_once() -> None:
    taken = pipeline().buffer_now(intake(b'{"id": "u", "text": "hello", "priority": "urgent"}'))
    assert isinstance(taken, Prepared)
    assert taken.error is None and taken.item is not None and taken.item.id == "u"
    assert taken.body is not None and taken.body["messages"]
