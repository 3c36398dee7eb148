"""The sync route's packer (pipeline/packer.py) over a fake provider: items arriving
together share one request, each gets its own outcome with its share; members missing
from the answer are sent alone; a lone item or an enrich.sync request is not packed."""

from __future__ import annotations

import asyncio
import json
import random
import re
from datetime import UTC, datetime
from typing import Any

from opentelemetry import trace

from handlers import build_registry
from service.core.cost import Price, Usage
from service.core.errors import ProviderError
from service.core.items import Item
from service.core.retry import RetryPolicy
from service.observability import telemetry
from service.pipeline.counters import Counters
from service.pipeline.packer import Packer
from service.pipeline.sync_call import SyncCall
from service.providers.openai_sync import ProviderResponse

NOW = datetime(2026, 12, 1, tzinfo=UTC)
REG = build_registry({"tags": {"pack": 8}}, chat_model="gpt-4o-mini", embedding_model="e")
ITEM_RE = re.compile(r'<item id="([A-Za-z0-9._:-]{1,128})">\n(.*?)\n</item>', re.DOTALL)
PRICES = {"gpt-4o-mini": Price(0.15, 0.60)}


class FakeProvider:
    """Answers single and packed requests; ``drop`` leaves out the last answers of packs;
    ``errors`` fails the next calls."""

    def __init__(self, drop: int = 0, errors: list[ProviderError] | None = None) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.drop = drop
        self.errors = list(errors or [])
        self.usage = Usage(0, 0)

    async def call(
        self, endpoint: str, body: dict[str, Any], timeout_s: float | None = None
    ) -> ProviderResponse:
        self.bodies.append(body)
        if self.errors:
            raise self.errors.pop(0)
        user = body["messages"][-1]["content"]
        blocks = ITEM_RE.findall(user)
        name = body["response_format"]["json_schema"]["name"]
        if name.endswith("_pack"):
            answers = [{"id": k, "result": {"tags": [f"t-{len(t)}"]}} for k, t in blocks]
            content = json.dumps({"answers": answers[: len(answers) - self.drop]})
            usage = Usage(50 + 20 * len(blocks), 10 * len(blocks))
        else:
            single = {"sentiment": {"sentiment": "neutral", "score": 0}}.get(name, {"tags": ["alone"]})
            content = json.dumps(single)
            usage = Usage(60, 8)
        self.usage = self.usage + usage
        body_out = {
            "choices": [{"message": {"content": content}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": usage.input_tokens, "completion_tokens": usage.output_tokens},
        }
        return ProviderResponse(body_out, usage, {})


def packer(provider: FakeProvider, linger_s: float = 0.05) -> Packer:
    sync = SyncCall(
        provider=provider,
        retry=RetryPolicy(max_attempts=3, base_s=0.001, max_backoff_s=0.01, max_elapsed_s=5),
        prices=PRICES,
        batch_discount=0.5,
        clock=lambda: NOW,
        rng=random.Random(1),
        counters=Counters(),
        metrics=telemetry.build(False)[0],
        tracer=trace.NoOpTracer(),
    )
    return Packer(sync, prices=PRICES, batch_discount=0.5, linger_s=linger_s)


async def run_all(p: Packer, ids: list[str], handler: str = "tags", **kw: Any) -> list[Any]:
    spec = REG[handler]

    async def one(i: str) -> Any:
        item = Item(id=i, handler=handler, text=f"text of {i}", priority="urgent")
        return await p.run(spec, item, spec.build_body(item), received_at=NOW, **kw)

    return await asyncio.gather(*(one(i) for i in ids))


async def test_items_arriving_together_share_requests() -> None:
    provider = FakeProvider()
    outcomes = await run_all(packer(provider), [f"u{i}" for i in range(20)])
    assert len(provider.bodies) == 3  # 8 + 8 + 4
    assert [o.packed for o in outcomes] == [8] * 16 + [4] * 4
    assert all(o.ok and o.result["tags"] for o in outcomes)
    assert [o.id for o in outcomes] == [f"u{i}" for i in range(20)]
    assert sum((o.usage for o in outcomes), Usage(0, 0)) == provider.usage
    assert all(o.cost_usd and o.cost_usd > 0 and o.handler_version == REG["tags"].version for o in outcomes)
    assert provider.bodies[0]["max_completion_tokens"] > 8 * REG["tags"].max_output_tokens


async def test_members_missing_from_the_answer_go_alone_with_their_share() -> None:
    provider = FakeProvider(drop=2)
    outcomes = await run_all(packer(provider), [f"u{i}" for i in range(8)])
    assert len(provider.bodies) == 1 + 2
    assert [o.packed for o in outcomes] == [8] * 6 + [1, 1]
    assert [o.attempts for o in outcomes] == [1] * 6 + [2, 2]
    assert all(o.ok for o in outcomes) and outcomes[-1].result == {"tags": ["alone"]}
    assert sum((o.usage for o in outcomes), Usage(0, 0)) == provider.usage


async def test_a_lone_item_and_a_request_are_sent_alone() -> None:
    provider = FakeProvider()
    [lone] = await run_all(packer(provider), ["only"])
    assert lone.packed == 1 and lone.ok and len(provider.bodies) == 1
    assert provider.bodies[0]["response_format"]["json_schema"]["name"] == "tags"
    requests = await run_all(packer(provider), ["r1", "r2"], packable=False)
    assert [o.packed for o in requests] == [1, 1] and len(provider.bodies) == 3


async def test_a_handler_that_does_not_pack_is_untouched() -> None:
    provider = FakeProvider()
    outcomes = await run_all(packer(provider), ["a", "b", "c"], handler="sentiment")
    assert len(provider.bodies) == 3 and all(o.packed == 1 for o in outcomes)


async def test_the_pack_request_is_retried_and_a_final_error_ends_every_member() -> None:
    provider = FakeProvider(errors=[ProviderError("provider_error", "503", retryable=True, status=503)])
    outcomes = await run_all(packer(provider), ["a", "b", "c"])
    assert len(provider.bodies) == 2 and all(o.ok and o.packed == 3 and o.attempts == 2 for o in outcomes)
    rejected = FakeProvider(errors=[ProviderError("bad_request", "no", retryable=False, status=400)])
    outcomes = await run_all(packer(rejected), ["a", "b", "c"])
    # rejected as a pack: each item alone
    assert len(rejected.bodies) == 4 and all(o.ok and o.packed == 1 for o in outcomes)
    down = [ProviderError("provider_error", "503", retryable=True, status=503)] * 10
    failing = FakeProvider(errors=down)
    outcomes = await run_all(packer(failing), ["a", "b"])
    assert all(not o.ok and o.error.code == "provider_error" and o.packed == 2 for o in outcomes)
