"""Routing, retry decisions and cost arithmetic: table-driven, time and randomness passed in."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest

from service.core.cost import Price, Usage, cost_usd, price_for
from service.core.errors import InvalidOutputError, ProviderError
from service.core.items import Item
from service.core.retry import RetryPolicy, decide
from service.core.routing import BatchRoute, BufferKey, RoutingRules, SyncRoute, route

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
RULES = RoutingRules(sync_priorities=frozenset({"urgent", "high"}), max_latency_s=86_400)


def item(priority: str = "normal", deadline: datetime | None = None) -> Item:
    return Item(id="i", handler="tags", text="t", priority=priority, deadline=deadline)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("priority", "deadline", "expected"),
    [
        ("urgent", None, SyncRoute),
        ("high", None, SyncRoute),
        ("normal", None, BatchRoute),
        ("low", None, BatchRoute),
        ("low", NOW + timedelta(hours=2), SyncRoute),
        ("normal", NOW + timedelta(hours=25), BatchRoute),
    ],
)
def test_route(priority: str, deadline: datetime | None, expected: type) -> None:
    decision = route(
        item(priority, deadline), endpoint="/v1/chat/completions", model="m", rules=RULES, now=NOW
    )
    assert isinstance(decision, expected)
    if isinstance(decision, BatchRoute):
        assert decision.key == BufferKey("openai", "/v1/chat/completions", "m")


def test_buffer_key_token_is_one_subject_token() -> None:
    token = BufferKey("openai", "/v1/chat/completions", "gpt-4.1-mini").subject_token()
    assert "." not in token and " " not in token and "*" not in token and ">" not in token


def test_sync_priorities_setting_changes_routing() -> None:
    rules = RoutingRules(sync_priorities=frozenset({"urgent"}), max_latency_s=86_400)
    assert isinstance(route(item("high"), endpoint="e", model="m", rules=rules, now=NOW), BatchRoute)


POLICY = RetryPolicy(
    max_attempts=3, base_s=1.0, max_backoff_s=8.0, max_elapsed_s=100.0, max_rate_limit_waits=2
)


def err(code: str, retryable: bool, after: float | None = None) -> ProviderError:
    return ProviderError(code, "m", retryable=retryable, retry_after_s=after)


def test_permanent_errors_are_not_retried() -> None:
    for code in ("bad_request", "auth_failed", "not_found"):
        d = decide(POLICY, err(code, False), attempt=1, rate_limit_waits=0, elapsed_s=0, rng=random.Random(1))
        assert not d.retry
    d = decide(
        POLICY,
        InvalidOutputError("refused", "no"),
        attempt=1,
        rate_limit_waits=0,
        elapsed_s=0,
        rng=random.Random(1),
    )
    assert not d.retry


def test_server_errors_back_off_with_full_jitter_and_stop_at_max_attempts() -> None:
    rng = random.Random(7)
    delays = []
    for attempt in (1, 2):
        d = decide(
            POLICY, err("provider_error", True), attempt=attempt, rate_limit_waits=0, elapsed_s=0, rng=rng
        )
        assert d.retry and d.counts_as_attempt
        delays.append(d.delay_s)
    assert 0 <= delays[0] <= 1.0 and 0 <= delays[1] <= 2.0
    assert not decide(
        POLICY, err("provider_error", True), attempt=3, rate_limit_waits=0, elapsed_s=0, rng=rng
    ).retry


def test_rate_limit_honours_retry_after_without_using_an_attempt() -> None:
    d = decide(
        POLICY,
        err("rate_limited", True, after=3.0),
        attempt=3,
        rate_limit_waits=0,
        elapsed_s=0,
        rng=random.Random(1),
    )
    assert d.retry and not d.counts_as_attempt
    assert 3.0 <= d.delay_s <= 4.0
    # after max_rate_limit_waits free waits, a 429 counts like any retryable error
    d = decide(
        POLICY,
        err("rate_limited", True, after=3.0),
        attempt=3,
        rate_limit_waits=2,
        elapsed_s=0,
        rng=random.Random(1),
    )
    assert not d.retry


def test_retry_after_beats_a_shorter_backoff_and_elapsed_budget_caps_everything() -> None:
    d = decide(
        POLICY,
        err("provider_error", True, after=5.0),
        attempt=1,
        rate_limit_waits=0,
        elapsed_s=0,
        rng=random.Random(1),
    )
    assert d.delay_s == 5.0
    assert not decide(
        POLICY,
        err("provider_error", True, after=5.0),
        attempt=1,
        rate_limit_waits=0,
        elapsed_s=99.0,
        rng=random.Random(1),
    ).retry


@pytest.mark.parametrize(
    ("model", "route_name", "expected"),
    [
        ("gpt-4o-mini", "sync", (1000 * 0.15 + 500 * 0.60) / 1e6),
        ("gpt-4o-mini-2024-07-18", "sync", (1000 * 0.15 + 500 * 0.60) / 1e6),
        ("gpt-4o-mini", "batch", (1000 * 0.15 + 500 * 0.60) / 1e6 / 2),
        ("unknown-model", "sync", None),
    ],
)
def test_cost(model: str, route_name: str, expected: float | None) -> None:
    table = {"gpt-4o-mini": Price(0.15, 0.60), "gpt-4o": Price(2.5, 10.0)}
    got = cost_usd(Usage(1000, 500), price_for(model, table), route=route_name, batch_discount=0.5)
    assert got == (None if expected is None else pytest.approx(expected))


def test_transient_errors_are_retried_for_the_time_budget_not_a_second() -> None:
    # A provider blip of a few seconds must not use up the retries (issue 10, point 7):
    # with the defaults, the waits add up to the time budget before the calls run out.
    policy = RetryPolicy()
    rng = random.Random(3)
    elapsed, attempt = 0.0, 1
    while True:
        d = decide(
            policy,
            err("connection_error", True),
            attempt=attempt,
            rate_limit_waits=0,
            elapsed_s=elapsed,
            rng=rng,
        )
        if not d.retry:
            break
        assert d.delay_s >= policy.backoff_s(attempt, random.Random(0)) / 2  # half of each wait is fixed
        elapsed += d.delay_s
        attempt += 1
    assert 30.0 <= elapsed <= policy.max_elapsed_s and attempt <= policy.max_attempts


def test_retries_stop_at_the_deadline() -> None:
    policy = RetryPolicy()
    rng = random.Random(1)
    later = decide(
        policy,
        err("timeout", True),
        attempt=4,
        rate_limit_waits=0,
        elapsed_s=3,
        rng=rng,
        until_deadline_s=1.0,
    )
    assert not later.retry  # the next wait (2-4 s) would end after the deadline
    soon = decide(
        policy,
        err("timeout", True),
        attempt=1,
        rate_limit_waits=0,
        elapsed_s=0,
        rng=rng,
        until_deadline_s=10.0,
    )
    assert soon.retry and soon.delay_s <= 0.5
