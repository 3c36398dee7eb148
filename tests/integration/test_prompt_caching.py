"""Prompt caching (issue 12): requests are built so the static part (system prompt,
instructions, schema) is an identical prefix across items; the provider's
``usage.prompt_tokens_details.cached_tokens`` is read, shown in the event's usage and
priced at the model's cached-input rate."""

from __future__ import annotations

import pytest

from service.core.cost import Usage, cost_usd
from tests.conftest import events, publish_items, read_stream

# A long, static system prompt (a style guide with examples), well over 1,024 tokens.
GUIDE = " ".join(
    f"Rule {n}: tag the text with short lowercase nouns about its topic {n}." for n in range(120)
)


async def test_repeated_static_prefix_is_billed_at_the_cached_rate(make_daemon, nc, prefix, emulator) -> None:
    emulator.reset_stats()
    emulator.clear_prompt_cache()
    daemon = await make_daemon(handlers={"tags": {"system": GUIDE}})
    js = nc.jetstream()
    items = [
        {"id": f"c{i}", "text": f"item number {i} about invoices", "priority": "urgent"} for i in range(6)
    ]
    await publish_items(js, f"{prefix}.in.tags", items[:1])  # the first warms the cache
    [first] = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 1))
    await publish_items(js, f"{prefix}.in.tags", items[1:])
    out = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", len(items)))
    assert len(out) == len(items) and all(e["status"] == "ok" for e in out)
    assert first["usage"].get("cached_tokens", 0) == 0
    later = [e for e in out if e["id"] != "c0"]
    price = daemon.settings.price_table["gpt-4o-mini"]
    for event in later:
        usage = event["usage"]
        assert usage["cached_tokens"] >= 1024 and (usage["cached_tokens"] - 1024) % 128 == 0
        assert usage["cached_tokens"] <= usage["input_tokens"]
        billed = Usage(usage["input_tokens"], usage["output_tokens"], usage["cached_tokens"])
        full = Usage(usage["input_tokens"], usage["output_tokens"])
        assert event["cost_usd"] == pytest.approx(cost_usd(billed, price, route="sync", batch_discount=0.5))
        assert event["cost_usd"] < cost_usd(full, price, route="sync", batch_discount=0.5)  # type: ignore[operator]
    assert emulator.stats["cached_tokens"] == sum(e["usage"]["cached_tokens"] for e in later)


def test_the_static_part_of_a_request_is_an_identical_prefix(tmp_path) -> None:
    from service.core.items import Item
    from service.settings import Settings

    registry = Settings(state_dir=tmp_path).registry
    for name, spec in registry.items():
        if spec.is_embedding:
            continue
        a = spec.build_body(
            Item(id="a", handler=name, text="first text", fields={"title": "t", "subject": "s"})
        )
        b = spec.build_body(
            Item(id="b", handler=name, text="other words", fields={"title": "u", "subject": "r"})
        )
        # everything but the user message is the same, and comes first
        assert {k: v for k, v in a.items() if k != "messages"} == {
            k: v for k, v in b.items() if k != "messages"
        }
        assert a["messages"][:-1] == b["messages"][:-1]
        assert a["messages"][-1]["role"] == "user"
