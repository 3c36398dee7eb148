"""Estimates that hold (issue 12): the observed-token tallies of the daily stats (merging
across replicas, old days without them) and the estimate's arithmetic (output guess,
route mix, packing, cost per route)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from service.core.cost import Price, Usage, cost_usd
from service.core.estimates import (
    MIN_OBSERVED,
    Observed,
    expected_route,
    mix_shares,
    observed_from_tallies,
    output_guess,
    packed_input_tokens,
    ratio,
    total_usd,
)
from service.core.items import Item
from service.core.routing import RoutingRules
from service.state.stats import DailyStats, HandlerFacts, add_event, empty_day, merge, paid_result

NOW = datetime(2026, 12, 3, 10, 30, tzinfo=UTC)
PRICE = Price(input_per_mtok=0.15, output_per_mtok=0.60)


def ok(
    handler: str = "tags",
    version: str = "aaaaaaaaaaaa",
    route: str = "sync",
    inp: int = 100,
    out: int = 20,
    **extra: Any,
) -> dict[str, Any]:
    event = {
        "id": "x",
        "handler": handler,
        "status": "ok",
        "route": route,
        "model": "gpt-4o-mini",
        "handler_version": version,
        "cached": False,
        "usage": {"input_tokens": inp, "output_tokens": out},
        "cost_usd": cost_usd(Usage(inp, out), PRICE, route=route, batch_discount=0.5),
    }
    return {**event, **extra}


def test_only_paid_ok_results_count_into_handler_tallies() -> None:
    assert paid_result(ok(cached=True)) is None
    assert paid_result(ok(status="error")) is None
    assert paid_result(ok(usage=None)) is None
    paid = paid_result(ok(handler_version=None))
    assert paid is not None and paid.version == "-" and paid.usage == Usage(100, 20)
    day = empty_day()
    add_event(day, ok(), NOW, estimate=(30, 0.00005))
    add_event(day, ok(route="batch", out=10), NOW, estimate=(30, 0.00001))
    add_event(day, ok(cached=True, cost_usd=0.0), NOW, estimate=(30, 0.1))
    add_event(day, ok(), NOW)  # no estimate known: only the route and result counts
    assert day["results"] == {"ok": 4, "error": 0}
    leaf = day["handlers"]["tags"]["aaaaaaaaaaaa"]
    assert leaf["sync"]["items"] == 1 and leaf["sync"]["output_tokens"] == 20
    assert leaf["sync"]["estimated_output_tokens"] == 30 and leaf["sync"]["estimated_usd"] == 0.00005
    assert leaf["batch"]["billed_usd"] == pytest.approx(
        cost_usd(Usage(100, 10), PRICE, route="batch", batch_discount=0.5)
    )


def test_merge_sums_handler_tallies_across_replicas_and_reads_old_days() -> None:
    a, b = empty_day(), empty_day()
    add_event(a, ok(), NOW, estimate=(25, 0.1))
    add_event(b, ok(), NOW, estimate=(15, 0.2))
    add_event(b, ok(version="bbbbbbbbbbbb", route="flex"), NOW, estimate=(15, 0.2))
    old = {"cost_usd": {"sync": 1.5}, "results": {"ok": 3, "error": 1}, "hours": {"10": 4}}  # before handlers
    total = merge([a, b, old, {}])
    assert total["results"] == {"ok": 6, "error": 1} and total["hours"]["10"] == 7
    assert total["cost_usd"]["sync"] == pytest.approx(1.5 + 2 * ok()["cost_usd"])
    sync = total["handlers"]["tags"]["aaaaaaaaaaaa"]["sync"]
    assert sync["items"] == 2 and sync["estimated_output_tokens"] == 40
    assert sync["estimated_usd"] == pytest.approx(0.3)
    assert total["handlers"]["tags"]["bbbbbbbbbbbb"]["flex"]["items"] == 1
    assert merge([old])["handlers"] == {}
    observed = observed_from_tallies(total["handlers"])
    assert observed[("tags", "aaaaaaaaaaaa")] == Observed(2, 200, 40)
    assert observed[("tags", "bbbbbbbbbbbb")] == Observed(1, 100, 20)


def test_output_guess_prefers_this_version_then_the_handler_then_the_bound() -> None:
    few = {("tags", "v1"): Observed(MIN_OBSERVED - 1, 0, 40 * (MIN_OBSERVED - 1))}
    assert output_guess({}, "tags", "v1", max_output_tokens=512).basis == "max_output_tokens"
    assert output_guess(few, "tags", "v1", max_output_tokens=512).per_item == 512
    enough = {("tags", "v1"): Observed(10, 1000, 400), ("tags", "v0"): Observed(30, 0, 3000)}
    mine = output_guess(enough, "tags", "v1", max_output_tokens=512)
    assert (mine.per_item, mine.basis, mine.observed_items) == (40.0, "version", 10)
    other = output_guess(enough, "tags", "v2", max_output_tokens=512)
    assert (other.per_item, other.basis, other.observed_items) == (85.0, "handler", 40)
    assert output_guess(enough, "tags", "v2", max_output_tokens=60).per_item == 60  # never above the bound
    assert output_guess(enough, "embed", "v1", max_output_tokens=512, embedding=True).per_item == 0
    assert "observed 40.0 per item over 10 results" in mine.describe(512)


def test_route_mix_follows_the_daemons_routing() -> None:
    rules = RoutingRules(sync_priorities=frozenset({"urgent", "high"}), max_latency_s=86_400)

    def item(priority: str = "normal", deadline: datetime | None = None) -> Item:
        return Item(id="i", handler="tags", text="t", priority=priority, deadline=deadline)  # type: ignore[arg-type]

    soon, later, near = NOW + timedelta(hours=2), NOW + timedelta(days=3), NOW + timedelta(minutes=5)
    assert expected_route(item("urgent"), rules=rules, flex=False, now=NOW) == "sync"
    assert expected_route(item(), rules=rules, flex=False, now=NOW) == "batch"
    assert expected_route(item("low", later), rules=rules, flex=False, now=NOW) == "batch"
    assert expected_route(item("normal", soon), rules=rules, flex=False, now=NOW) == "sync"
    flex = RoutingRules(frozenset({"urgent"}), 86_400, flex=True)
    assert expected_route(item("normal", soon), rules=flex, flex=True, now=NOW) == "flex"
    assert expected_route(item("normal", near), rules=flex, flex=True, now=NOW) == "sync"  # no room for flex
    assert expected_route(item("high"), rules=flex, flex=True, now=NOW) == "batch"


def test_packing_shares_the_system_prompt_once_per_pack() -> None:
    assert packed_input_tokens([100] * 10, shared=30, pack=1) == 1000
    assert packed_input_tokens([100] * 10, shared=30, pack=4) == 1000 - (10 - 3) * 30
    assert packed_input_tokens([], shared=30, pack=4) == 0


def test_mix_cost_prices_flex_and_batch_at_the_discount() -> None:
    routed = [("sync", 100), ("sync", 100), ("flex", 100), ("batch", 100), ("batch", 100), ("batch", 100)]
    shares = {
        s.route: s
        for s in mix_shares(
            routed, output_per_item=20, shared_tokens=0, pack=1, price=PRICE, batch_discount=0.5
        )
    }
    assert [shares[r].items for r in ("sync", "flex", "batch")] == [2, 1, 3]
    one_sync = cost_usd(Usage(100, 20), PRICE, route="sync", batch_discount=0.5)
    assert one_sync is not None
    assert shares["sync"].usd == pytest.approx(2 * one_sync)
    assert shares["flex"].usd == pytest.approx(one_sync / 2)
    assert shares["batch"].usd == pytest.approx(3 * one_sync / 2)
    assert total_usd(shares.values()) == pytest.approx(2 * one_sync + 4 * one_sync / 2)
    unpriced = mix_shares(routed, output_per_item=20, shared_tokens=0, pack=1, price=None, batch_discount=0.5)
    assert total_usd(unpriced) is None
    assert ratio(1.1, 1.0) == 1.1 and ratio(None, 1.0) is None and ratio(1.0, 0.0) is None


class FakeKV:
    """Enough of nats-py's KeyValue for DailyStats."""

    def __init__(self, data: dict[str, dict[str, Any]] | None = None) -> None:
        self.data = {k: json.dumps(v).encode() for k, v in (data or {}).items()}

    async def get(self, key: str) -> Any:
        if key not in self.data:
            raise KeyError(key)
        return type("Entry", (), {"value": self.data[key]})()

    async def put(self, key: str, value: bytes) -> None:
        self.data[key] = value

    async def keys(self) -> list[str]:
        return list(self.data)


async def test_daily_stats_estimate_each_result_from_what_was_observed_before_it() -> None:
    other = empty_day()
    for _ in range(MIN_OBSERVED):
        add_event(other, ok(out=50), NOW, estimate=(512, None))
    old = {"cost_usd": {"sync": 0.5}, "results": {"ok": 1, "error": 0}, "hours": {}}
    kv = FakeKV({"20261203.other": other, "20261202.me": old})
    stats = DailyStats(
        kv,  # type: ignore[arg-type]
        "me",
        clock=lambda: NOW,
        facts={"tags": HandlerFacts(max_output_tokens=512)},
        prices={"gpt-4o-mini": PRICE},
    )
    await stats._load("20261203")
    await stats.refresh()
    assert stats.observed()[("tags", "aaaaaaaaaaaa")] == Observed(
        MIN_OBSERVED, 100 * MIN_OBSERVED, 50 * MIN_OBSERVED
    )
    stats.record(ok(out=10))  # expected: the other replica's 50 per item
    stats.record(ok(out=10, cached=True))  # not counted
    stats.record(ok(handler="unknown", out=10))  # not a configured handler: no handler tally
    await stats.save()
    mine = json.loads(kv.data["20261203.me"])
    leaf = mine["handlers"]["tags"]["aaaaaaaaaaaa"]["sync"]
    assert leaf["items"] == 1 and leaf["output_tokens"] == 10 and leaf["estimated_output_tokens"] == 50
    assert leaf["estimated_usd"] == pytest.approx(
        cost_usd(Usage(100, 50), PRICE, route="sync", batch_discount=0.5)
    )
    assert "unknown" not in mine["handlers"] and mine["results"]["ok"] == 3
    seen = stats.observed()[("tags", "aaaaaaaaaaaa")]
    assert seen.items == MIN_OBSERVED + 1 and seen.output_tokens == 50 * MIN_OBSERVED + 10
    # a restart carries on from what this replica wrote, without counting it twice
    again = DailyStats(kv, "me", clock=lambda: NOW, facts={"tags": HandlerFacts(512)})  # type: ignore[arg-type]
    await again._load("20261203")
    await again.refresh()
    assert again.observed() == stats.observed()


def test_status_rows_sum_today_per_handler_with_the_current_version(tmp_path) -> None:
    from service.cli.status import handler_rows
    from service.settings import load_settings

    config = tmp_path / "c.toml"
    config.write_text("")
    settings = load_settings(config)
    day = empty_day()
    add_event(day, ok(version="old000000000", out=30), NOW, estimate=(60, 0.0002))
    add_event(day, ok(route="batch", out=10), NOW, estimate=(20, 0.00005))
    add_event(day, ok(handler="gone", out=10), NOW, estimate=(20, 0.00005))
    rows = {r["handler"]: r for r in handler_rows(settings, day["handlers"])}
    tags = rows["tags"]
    assert tags["handler_version"] == settings.registry["tags"].version and tags["model"] == "gpt-4o-mini"
    today = tags["today"]
    assert today["items"] == 2 and today["routes"] == {"sync": 1, "batch": 1}
    assert today["versions"] == {"old000000000": 1, "aaaaaaaaaaaa": 1}
    assert today["output_tokens"] == 40 and today["estimated_output_tokens"] == 80
    billed = ok(out=30)["cost_usd"] + ok(route="batch", out=10)["cost_usd"]
    assert today["billed_usd"] == pytest.approx(billed, abs=1e-6)
    assert today["estimate_over_billed"] == pytest.approx(0.00025 / billed, rel=1e-3)
    assert (
        rows["summarize"]["today"]["items"] == 0
        and rows["summarize"]["today"]["estimate_over_billed"] is None
    )
    assert (
        rows["gone"]["model"] is None and rows["gone"]["today"]["items"] == 1
    )  # known only to today's stats
