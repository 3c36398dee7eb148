"""Second-wave emulator features over real HTTP, through the real ``openai`` SDK:
flex processing (``service_tier``), prompt-caching accounting and packed prompts."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import jsonschema
import openai
import pytest
from openai import AsyncOpenAI
from openai.types import Batch

from service.core.tokens import count_tokens
from service.emulator import Emulator, EmulatorConfig, FaultConfig

API_KEY = "sk-emulator-test-0123456789abcdef"
TERMINAL = {"completed", "failed", "expired", "cancelled"}
NOTE = "The quarterly invoice from Acme Corp is overdue by thirty days. Accounting should call them."
ITEMS = {
    "a1": "The quarterly invoice from Acme Corp is overdue by thirty days. Accounting should call them.",
    "b.2": "Server outage in region eu-west since 09:00. Customers report failed logins and timeouts.",
    "c:3": "Lunch with the design team moved to Friday. Bring the prototype sketches and the budget.",
}
ITEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "summary": {"type": "string"},
        "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
        "urgency": {"type": "integer", "minimum": 1, "maximum": 5},
    },
    "required": ["summary", "sentiment", "urgency"],
    "additionalProperties": False,
}


def pack_format(item_schema: dict[str, Any], name: str = "triage") -> Any:
    """The daemon's pack ``response_format`` (wire format fixed by the packing code)."""
    schema = {
        "type": "object",
        "properties": {
            "answers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"id": {"type": "string"}, "result": item_schema},
                    "required": ["id", "result"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["answers"],
        "additionalProperties": False,
    }
    return {"type": "json_schema", "json_schema": {"name": f"{name}_pack", "strict": True, "schema": schema}}


def pack_messages(items: dict[str, str]) -> list[Any]:
    blocks = "\n\n".join(f'<item id="{key}">\n{text}\n</item>' for key, text in items.items())
    system = "You triage notes. Answer every item below, keyed by its id, in the answers array."
    return [{"role": "system", "content": system}, {"role": "user", "content": blocks}]


def long_system_prompt(tokens: int) -> str:
    words: list[str] = []
    rule = 0
    while count_tokens(" ".join(words)) < tokens:
        words.append(f"Rule {rule}: keep the customer's tone and never invent facts.")
        rule += 1
    return " ".join(words)


@pytest.fixture
async def emulator() -> AsyncIterator[Emulator]:
    config = EmulatorConfig(
        api_key=API_KEY, batch_delay_s=0.3, seed=0, flex_models=["gpt-4o-mini", "o4-mini"]
    )
    emu = Emulator(config)
    await emu.start()
    try:
        yield emu
    finally:
        await emu.stop()


@pytest.fixture
async def client(emulator: Emulator) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=emulator.base_url, api_key=API_KEY, max_retries=0, timeout=10) as sdk:
        yield sdk


def user(text: str) -> list[Any]:
    return [{"role": "system", "content": "You triage notes."}, {"role": "user", "content": text}]


# --- flex processing -------------------------------------------------------------------------------


async def test_flex_is_echoed_slower_and_counted(emulator: Emulator, client: AsyncOpenAI) -> None:
    emulator.set_faults(FaultConfig(flex_latency_s=0.4))
    started = time.perf_counter()
    standard = await client.chat.completions.create(model="gpt-4o-mini", messages=user(NOTE))
    standard_s = time.perf_counter() - started
    started = time.perf_counter()
    flex = await client.chat.completions.create(model="gpt-4o-mini", messages=user(NOTE), service_tier="flex")
    flex_s = time.perf_counter() - started
    auto = await client.chat.completions.create(model="gpt-4o-mini", messages=user(NOTE), service_tier="auto")
    assert standard.service_tier == "default" and auto.service_tier == "default"
    assert flex.service_tier == "flex"
    assert flex_s >= 0.4 > standard_s
    # Same prompt, same answer: the tier changes how it is served, not what it says.
    assert flex.choices[0].message.content == standard.choices[0].message.content
    stats = emulator.stats
    assert stats["requests_by_tier"] == {"default": 1, "flex": 1, "auto": 1}
    assert stats["chat_ok_by_tier"] == {"default": 2, "flex": 1}
    assert stats["requests_by_model"] == {"gpt-4o-mini": 3}
    assert stats["flex_refusals"] == 0


async def test_flex_refused_with_resource_unavailable(emulator: Emulator, client: AsyncOpenAI) -> None:
    emulator.set_faults(FaultConfig(flex_unavailable_rate=1.0))
    for _ in range(3):
        with pytest.raises(openai.RateLimitError) as caught:
            await client.chat.completions.create(
                model="gpt-4o-mini", messages=user(NOTE), service_tier="flex"
            )
        error = caught.value
        assert error.status_code == 429 and error.code == "resource_unavailable"
        assert error.param is None and "Resource Unavailable" in error.message
        assert "retry-after" not in error.response.headers
    # The standard tier is not affected.
    ok = await client.chat.completions.create(
        model="gpt-4o-mini", messages=user(NOTE), service_tier="default"
    )
    assert ok.service_tier == "default"
    stats = emulator.stats
    assert stats["flex_refusals"] == 3 and stats["faults_injected"]["flex_unavailable"] == 3
    assert stats["requests_by_tier"] == {"flex": 3, "default": 1}
    assert stats["chat_ok_by_tier"] == {"default": 1}
    assert stats["status_counts"] == {429: 3, 200: 1}


async def test_flex_refusal_rate_is_seeded_and_one_shots_come_first(
    emulator: Emulator, client: AsyncOpenAI
) -> None:
    async def outcomes() -> list[bool]:
        seen = []
        for _ in range(12):
            try:
                await client.chat.completions.create(
                    model="gpt-4o-mini", messages=user(NOTE), service_tier="flex"
                )
                seen.append(True)
            except openai.RateLimitError:
                seen.append(False)
        return seen

    emulator.set_faults(FaultConfig(flex_unavailable_rate=0.5, flex_latency_s=0))
    first = await outcomes()
    emulator.set_faults(FaultConfig(flex_unavailable_rate=0.5, flex_latency_s=0))
    assert await outcomes() == first and True in first and False in first
    emulator.set_faults(FaultConfig(flex_unavailable_next=2, flex_latency_s=0))
    assert await outcomes() == [False, False] + [True] * 10


async def test_flex_retry_after_when_configured(emulator: Emulator, client: AsyncOpenAI) -> None:
    emulator.set_faults(FaultConfig(flex_unavailable_next=1, flex_retry_after_s=2))
    with pytest.raises(openai.RateLimitError) as caught:
        await client.chat.completions.create(model="gpt-4o-mini", messages=user(NOTE), service_tier="flex")
    assert caught.value.response.headers["retry-after"] == "2"


async def test_flex_on_an_unsupported_model_is_400(emulator: Emulator, client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(model="gpt-4o", messages=user(NOTE), service_tier="flex")
    error = caught.value
    assert error.status_code == 400 and error.param == "service_tier"
    assert error.type == "invalid_request_error" and "gpt-4o" in error.message
    ok = await client.chat.completions.create(model="gpt-4o", messages=user(NOTE))
    assert ok.service_tier == "default"
    assert emulator.stats["flex_unsupported_model"] == 1
    assert emulator.stats["requests_by_model"] == {"gpt-4o": 2}


async def test_unknown_service_tier_is_400(client: AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        await client.chat.completions.create(
            model="gpt-4o-mini", messages=user(NOTE), extra_body={"service_tier": "turbo"}
        )
    assert caught.value.code == "invalid_value" and caught.value.param == "service_tier"
    assert "'turbo'" in caught.value.message
    priority = await client.chat.completions.create(
        model="gpt-4o-mini", messages=user(NOTE), service_tier="priority"
    )
    assert priority.service_tier == "priority"


async def test_stats_over_http(emulator: Emulator, client: AsyncOpenAI) -> None:
    await client.chat.completions.create(model="gpt-4o-mini", messages=user(NOTE), service_tier="flex")
    stats_url = emulator.base_url.removesuffix("/v1") + "/_emulator/stats"
    async with aiohttp.ClientSession() as http, http.get(stats_url) as response:
        stats = await response.json()
    assert stats["requests_by_tier"] == {"flex": 1}
    assert stats["chat_ok_by_tier"] == {"flex": 1}
    assert stats["requests_by_model"] == {"gpt-4o-mini": 1}


# --- prompt caching --------------------------------------------------------------------------------


async def test_cached_tokens_for_a_shared_long_system_prompt(emulator: Emulator, client: AsyncOpenAI) -> None:
    system = long_system_prompt(1500)

    async def ask(text: str, model: str = "gpt-4o-mini") -> Any:
        messages: Any = [{"role": "system", "content": system}, {"role": "user", "content": text}]
        return await client.chat.completions.create(model=model, messages=messages)

    first = await ask("First note: the invoice is overdue.")
    second = await ask("Second note: the server is down again.")
    assert first.usage and second.usage
    assert first.usage.prompt_tokens_details and second.usage.prompt_tokens_details
    assert first.usage.prompt_tokens_details.cached_tokens == 0
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached is not None and 1024 <= cached <= 1408 and (cached - 1024) % 128 == 0
    assert cached <= second.usage.prompt_tokens
    assert second.usage.prompt_tokens_details.audio_tokens == 0
    assert second.usage.completion_tokens_details is not None
    assert second.usage.completion_tokens_details.reasoning_tokens == 0
    # The cache is per model, and a short prompt is never cached.
    other = await ask("Third note.", model="gpt-4.1-mini")
    assert other.usage and other.usage.prompt_tokens_details
    assert other.usage.prompt_tokens_details.cached_tokens == 0
    for _ in range(2):
        short = await client.chat.completions.create(model="gpt-4o-mini", messages=user(NOTE))
        assert short.usage and short.usage.prompt_tokens_details
        assert short.usage.prompt_tokens_details.cached_tokens == 0
    stats = emulator.stats
    assert stats["cached_tokens"] == cached and stats["prompt_cache_hits"] == 1
    emulator.clear_prompt_cache()
    again = await ask("Fourth note.")
    assert again.usage and again.usage.prompt_tokens_details
    assert again.usage.prompt_tokens_details.cached_tokens == 0


async def test_a_different_schema_shares_no_prefix(client: AsyncOpenAI) -> None:
    system = long_system_prompt(1300)
    messages: Any = [{"role": "system", "content": system}, {"role": "user", "content": NOTE}]
    plain = await client.chat.completions.create(model="gpt-4o-mini", messages=messages)
    structured = await client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, response_format=pack_format({"type": "string"})
    )
    repeat = await client.chat.completions.create(
        model="gpt-4o-mini", messages=messages, response_format=pack_format({"type": "string"})
    )
    assert plain.usage and structured.usage and repeat.usage
    assert structured.usage.prompt_tokens_details and repeat.usage.prompt_tokens_details
    assert structured.usage.prompt_tokens_details.cached_tokens == 0
    assert (repeat.usage.prompt_tokens_details.cached_tokens or 0) >= 1024


async def test_cached_tokens_expire_with_the_emulator_clock() -> None:
    now = [1000.0]
    emu = Emulator(EmulatorConfig(prompt_cache_ttl_s=600), clock=lambda: now[0])
    await emu.start()
    try:
        async with AsyncOpenAI(base_url=emu.base_url, api_key="x", max_retries=0) as sdk:
            messages: Any = [{"role": "system", "content": long_system_prompt(1200)}]

            async def cached() -> int:
                done = await sdk.chat.completions.create(model="gpt-4o-mini", messages=messages)
                assert done.usage and done.usage.prompt_tokens_details
                return done.usage.prompt_tokens_details.cached_tokens or 0

            assert await cached() == 0
            now[0] += 599
            assert await cached() >= 1024  # seen again: the TTL restarts
            now[0] += 601
            assert await cached() == 0
    finally:
        await emu.stop()


# --- packed prompts --------------------------------------------------------------------------------


async def pack_answers(client: AsyncOpenAI, items: dict[str, str], item_schema: dict[str, Any]) -> Any:
    completion = await client.chat.completions.create(
        model="gpt-4o-mini",
        messages=pack_messages(items),
        response_format=pack_format(item_schema),
        max_completion_tokens=2000,
    )
    content = completion.choices[0].message.content
    assert content is not None and completion.choices[0].finish_reason == "stop"
    return completion, json.loads(content)


async def test_packed_text_request_answered_per_id(emulator: Emulator, client: AsyncOpenAI) -> None:
    completion, value = await pack_answers(client, ITEMS, {"type": "string"})
    assert [a["id"] for a in value["answers"]] == list(ITEMS)
    jsonschema.validate(value, pack_format({"type": "string"})["json_schema"]["schema"])
    for answer in value["answers"]:
        # Each result comes from that item's own text.
        first_sentence = ITEMS[answer["id"]].split(". ")[0]
        assert answer["result"].startswith(first_sentence)
    assert completion.usage.prompt_tokens > 60 and completion.usage.completion_tokens > 30
    # Same item, other companions: same result.
    _, alone = await pack_answers(client, {"b.2": ITEMS["b.2"]}, {"type": "string"})
    assert alone["answers"][0]["result"] == value["answers"][1]["result"]
    stats = emulator.stats
    assert stats["packed_requests"] == 2 and stats["packed_items_answered"] == 4


async def test_packed_structured_request_is_valid(client: AsyncOpenAI) -> None:
    _, value = await pack_answers(client, ITEMS, ITEM_SCHEMA)
    assert [a["id"] for a in value["answers"]] == list(ITEMS)
    jsonschema.validate(value, pack_format(ITEM_SCHEMA)["json_schema"]["schema"])
    for answer in value["answers"]:
        jsonschema.validate(answer["result"], ITEM_SCHEMA)
        assert answer["result"]["summary"].startswith(ITEMS[answer["id"]].split(". ")[0])


async def test_pack_drop_omits_the_last_answers(emulator: Emulator, client: AsyncOpenAI) -> None:
    emulator.set_faults(FaultConfig(pack_drop=1))
    _, value = await pack_answers(client, ITEMS, ITEM_SCHEMA)
    assert [a["id"] for a in value["answers"]] == ["a1", "b.2"]
    emulator.set_faults(FaultConfig(pack_drop_next=[2, 0]))
    _, first = await pack_answers(client, ITEMS, {"type": "string"})
    _, second = await pack_answers(client, ITEMS, {"type": "string"})
    _, third = await pack_answers(client, ITEMS, {"type": "string"})
    assert [len(v["answers"]) for v in (first, second, third)] == [1, 3, 3]
    # An unpacked request (the daemon's retry of a missing item) is not affected.
    emulator.set_faults(FaultConfig(pack_drop=5))
    single = await client.chat.completions.create(model="gpt-4o-mini", messages=user(ITEMS["c:3"]))
    assert single.choices[0].message.content
    assert emulator.stats["pack_answers_dropped"] == 3


async def test_pack_item_markers_omit_or_break_one_answer(client: AsyncOpenAI) -> None:
    items = dict(ITEMS)
    items["a1"] += " [[emulator:pack_omit]]"
    items["c:3"] += " [[emulator:pack_invalid]]"
    _, value = await pack_answers(client, items, ITEM_SCHEMA)
    assert [a["id"] for a in value["answers"]] == ["b.2", "c:3"]
    jsonschema.validate(value["answers"][0]["result"], ITEM_SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(value["answers"][1]["result"], ITEM_SCHEMA)


# --- batches ---------------------------------------------------------------------------------------


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return ("\n".join(json.dumps(line) for line in lines) + "\n").encode()


async def run_batch(client: AsyncOpenAI, lines: list[dict[str, Any]]) -> tuple[Batch, list[dict[str, Any]]]:
    uploaded = await client.files.create(file=("b.jsonl", jsonl(lines), "application/jsonl"), purpose="batch")
    batch = await client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    done: Callable[[Batch], bool] = lambda b: b.status in TERMINAL  # noqa: E731
    deadline = asyncio.get_running_loop().time() + 15
    while not done(batch):
        assert asyncio.get_running_loop().time() < deadline, f"batch stuck in {batch.status}"
        await asyncio.sleep(0.05)
        batch = await client.batches.retrieve(batch.id)
    assert batch.output_file_id
    content = await client.files.content(batch.output_file_id)
    return batch, [json.loads(line) for line in content.text.splitlines() if line.strip()]


def line(custom_id: str, **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


async def test_packing_caching_and_tiers_in_batch_lines(emulator: Emulator, client: AsyncOpenAI) -> None:
    emulator.set_faults(FaultConfig(pack_drop_next=[1]))
    system = long_system_prompt(1500)
    lines = [
        line(
            "pack-1",
            model="gpt-4o-mini",
            messages=pack_messages(ITEMS),
            response_format=pack_format(ITEM_SCHEMA),
        ),
        line(
            "pack-2",
            model="gpt-4o-mini",
            messages=pack_messages({"z": ITEMS["b.2"]}),
            response_format=pack_format({"type": "string"}),
        ),
        # service_tier on a batch line: accepted and ignored.
        line("flex", model="gpt-4o-mini", messages=user(NOTE), service_tier="flex"),
        line(
            "long-1", model="gpt-4o-mini", messages=[{"role": "system", "content": system}, *user(NOTE)[1:]]
        ),
        line(
            "long-2",
            model="gpt-4o-mini",
            messages=[{"role": "system", "content": system}, *user("Other.")[1:]],
        ),
    ]
    batch, outputs = await run_batch(client, lines)
    assert batch.status == "completed" and batch.request_counts and batch.request_counts.completed == 5
    bodies = {o["custom_id"]: o["response"]["body"] for o in outputs}
    packs = [json.loads(bodies[k]["choices"][0]["message"]["content"]) for k in ("pack-1", "pack-2")]
    # One of the two packs lost its last answer (lines run shuffled, so either one).
    assert [len(p["answers"]) for p in packs] in ([2, 1], [3, 0])
    for answer in packs[0]["answers"]:
        jsonschema.validate(answer["result"], ITEM_SCHEMA)
    assert [a["id"] for a in packs[0]["answers"]] == ["a1", "b.2", "c:3"][: len(packs[0]["answers"])]
    assert all(body["service_tier"] == "default" for body in bodies.values())
    cached = sorted(
        bodies[k]["usage"]["prompt_tokens_details"]["cached_tokens"] for k in ("long-1", "long-2")
    )
    assert cached[0] == 0 and 1024 <= cached[1] <= 1408 and (cached[1] - 1024) % 128 == 0
    stats = emulator.stats
    assert stats["packed_requests"] == 2 and stats["packed_items_answered"] == 3
    assert stats["pack_answers_dropped"] == 1
    assert stats["batch_lines_by_model"] == {"gpt-4o-mini": 5}
    assert stats["cached_tokens"] == cached[1]
    assert stats["requests_by_tier"] == {}  # batch lines are not sync chat requests
