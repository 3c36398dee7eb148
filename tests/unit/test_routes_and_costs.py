"""Pure decisions of the second wave: routes and deadlines (CONTRACT §11), the flex
retry rule, promotion, costs with cached input and flex, usage shares, handler versions."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from handlers import HandlerConfigError, HandlerSpec, build_registry
from service.core.cost import Price, Usage, cost_usd, split_usage, supports_flex, usage_from_openai
from service.core.errors import ProviderError
from service.core.items import Item
from service.core.retry import RetryPolicy, flex_retry_delay
from service.core.routing import (
    BatchRoute,
    FlexRoute,
    RoutingRules,
    SyncRoute,
    flex_allowed,
    promote_due,
    route,
)

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
RULES = RoutingRules(
    sync_priorities=frozenset({"urgent", "high"}), max_latency_s=86_400, flex=True, flex_timeout_s=900
)


def _item(priority: str = "normal", deadline_in_s: float | None = None) -> Item:
    deadline = None if deadline_in_s is None else NOW + timedelta(seconds=deadline_in_s)
    return Item(id="a", handler="tags", text="t", priority=priority, deadline=deadline)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("priority", "deadline_in_s", "flex", "expected"),
    [
        ("urgent", None, True, SyncRoute),
        ("high", 3600, True, SyncRoute),
        ("normal", None, True, BatchRoute),
        ("low", 2 * 86_400, True, BatchRoute),  # the batch path meets it
        ("normal", 3600, True, FlexRoute),  # before the batch path could answer
        ("normal", 3600, False, SyncRoute),  # flex not allowed for this handler
        ("normal", 900 + 30 - 1, True, SyncRoute),  # too near for a whole flex call + fallback
        ("normal", 900 + 30, True, FlexRoute),
        ("normal", -60, True, SyncRoute),  # already late: answered, late, on sync
    ],
)
def test_route_table(priority: str, deadline_in_s: float | None, flex: bool, expected: type) -> None:
    decision = route(
        _item(priority, deadline_in_s),
        endpoint="/v1/chat/completions",
        model="m",
        rules=RULES,
        now=NOW,
        flex=flex,
    )
    assert isinstance(decision, expected)


@pytest.mark.parametrize(
    ("handler_flex", "routing_flex", "model_has_flex", "chat", "expected"),
    [
        (None, True, True, True, True),
        (None, False, True, True, False),
        (True, False, True, True, True),
        (False, True, True, True, False),
        (None, True, False, True, False),  # an unsupported model never gets a flex call
        (True, True, True, False, False),  # embeddings have no flex tier
    ],
)
def test_flex_allowed(handler_flex, routing_flex, model_has_flex, chat, expected) -> None:
    assert (
        flex_allowed(
            handler_flex=handler_flex, routing_flex=routing_flex, model_has_flex=model_has_flex, chat=chat
        )
        is expected
    )


@pytest.mark.parametrize(
    ("deadline_in_s", "due"), [(None, False), (901, False), (900, True), (10, True), (-5, True)]
)
def test_promotion_is_due_within_the_margin(deadline_in_s: float | None, due: bool) -> None:
    deadline = None if deadline_in_s is None else NOW + timedelta(seconds=deadline_in_s)
    assert promote_due(deadline, now=NOW, rules=RULES) is due


REFUSED = ProviderError("resource_unavailable", "no flex capacity", retryable=True, status=429)
POLICY = RetryPolicy(max_attempts=5, base_s=1.0, max_backoff_s=8.0, max_elapsed_s=60)


@pytest.mark.parametrize(
    ("error", "attempt", "left_s", "retry"),
    [
        (REFUSED, 1, None, True),
        (REFUSED, 1, 10_000, True),
        (REFUSED, 1, 930.5, False),  # after the wait, less than flex_lead_s would be left
        (REFUSED, 5, 10_000, False),  # attempts used up
        (ProviderError("bad_request", "no", retryable=False, status=400), 1, 10_000, False),
    ],
)
def test_flex_retry_rule(error: ProviderError, attempt: int, left_s: float | None, retry: bool) -> None:
    delay = flex_retry_delay(POLICY, error, attempt=attempt, left_s=left_s, lead_s=930, rng=random.Random(1))
    assert (delay is not None) is retry


def test_cached_input_and_flex_prices() -> None:
    price = Price(input_per_mtok=1.0, output_per_mtok=4.0, cached_input_per_mtok=0.1, flex=True)
    usage = Usage(input_tokens=2_000_000, output_tokens=1_000_000, cached_tokens=1_000_000)
    assert cost_usd(usage, price, route="sync", batch_discount=0.5) == pytest.approx(1.0 + 0.1 + 4.0)
    assert cost_usd(usage, price, route="flex", batch_discount=0.5) == pytest.approx((1.0 + 0.1 + 4.0) / 2)
    assert cost_usd(usage, price, route="batch", batch_discount=0.5) == pytest.approx((1.0 + 0.1 + 4.0) / 2)
    no_rate = Price(input_per_mtok=1.0, output_per_mtok=4.0)
    assert cost_usd(usage, no_rate, route="sync", batch_discount=0.5) == pytest.approx(2.0 + 4.0)
    assert supports_flex("gpt-5-mini-2025-08-07", {"gpt-5-mini": price}) is True
    assert supports_flex("gpt-4o-mini", {"gpt-5-mini": price}) is False


def test_usage_from_openai_reads_cached_tokens() -> None:
    body = {"prompt_tokens": 1500, "completion_tokens": 20, "prompt_tokens_details": {"cached_tokens": 1024}}
    assert usage_from_openai(body) == Usage(1500, 20, 1024)
    assert usage_from_openai({"prompt_tokens": 3}) == Usage(3, 0, 0)
    assert usage_from_openai(None) == Usage(0, 0)
    assert Usage(1, 2, 3).to_dict() == {"input_tokens": 1, "output_tokens": 2, "cached_tokens": 3}
    assert Usage(1, 2).to_dict() == {"input_tokens": 1, "output_tokens": 2}


@pytest.mark.parametrize("weights", [[1], [1, 1, 1], [5, 1, 1, 9], [0, 0], [100, 3, 7, 7, 7, 7, 7, 1]])
def test_usage_shares_add_up_exactly(weights: list[int]) -> None:
    total = Usage(1001, 333, 257)
    shares = split_usage(total, weights)
    assert len(shares) == len(weights)
    assert sum(s.input_tokens for s in shares) == total.input_tokens
    assert sum(s.output_tokens for s in shares) == total.output_tokens
    assert sum(s.cached_tokens for s in shares) == total.cached_tokens


def test_handler_version_follows_the_definition() -> None:
    base = {"model": "gpt-4o-mini", "prompt": "Tag: {text}"}
    one = HandlerSpec(name="h", **base)  # type: ignore[arg-type]
    assert one.version == HandlerSpec(name="h", **base).version  # type: ignore[arg-type]
    assert len(one.version) == 12 and int(one.version, 16) >= 0
    for change in ({"prompt": "Tags: {text}"}, {"model": "gpt-4o"}, {"pack": 4}, {"max_output_tokens": 9}):
        assert HandlerSpec(name="h", **{**base, **change}).version != one.version  # type: ignore[arg-type]
    assert HandlerSpec(name="h", flex=True, **base).version == one.version  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"tags": {"pack": 0}}, "handlers.tags.pack"),
        ({"tags": {"pack": 101}}, "handlers.tags.pack"),
        ({"tags": {"pack": "eight"}}, "handlers.tags.pack"),
        ({"tags": {"flex": "yes"}}, "handlers.tags.flex"),
    ],
)
def test_bad_pack_and_flex_keys_name_the_key(table: dict, key: str) -> None:
    with pytest.raises(HandlerConfigError) as info:
        build_registry(table, chat_model="gpt-4o-mini", embedding_model="text-embedding-3-small")
    assert info.value.key == key


def test_handler_numbers_and_booleans_from_the_environment_are_read() -> None:
    registry = build_registry(
        {"tags": {"pack": "8", "flex": "false", "max_output_tokens": "99", "temperature": "0.5"}},
        chat_model="gpt-4o-mini",
        embedding_model="text-embedding-3-small",
    )
    spec = registry["tags"]
    assert (spec.pack, spec.flex, spec.max_output_tokens, spec.temperature) == (8, False, 99, 0.5)
