"""Pure parts of the emulator's second wave: service_tier parsing, the prompt-cache grid
and LRU, and pack detection / answers."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest
from pydantic import ValidationError

from service.core.tokens import count_chat_tokens
from service.emulator import EmulatedError, FaultConfig
from service.emulator.batch_output import run_line
from service.emulator.chat import AnswerContext, answer_chat, parse_chat_request, served_tier
from service.emulator.pack import detect_pack, item_schema_of, pack_answer
from service.emulator.prompt_cache import PromptCache, cacheable_length, prompt_token_ids

ITEM_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"label": {"type": "string", "enum": ["bug", "question"]}, "summary": {"type": "string"}},
    "required": ["label", "summary"],
    "additionalProperties": False,
}


def pack_schema(item: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "answers": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"id": {"type": "string"}, "result": item},
                    "required": ["id", "result"],
                    "additionalProperties": False,
                },
            }
        },
        "required": ["answers"],
        "additionalProperties": False,
    }


def pack_body(items: dict[str, str], item: Any, **extra: Any) -> dict[str, Any]:
    blocks = "\n\n".join(f'<item id="{k}">\n{v}\n</item>' for k, v in items.items())
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "system", "content": "Answer each item."}, {"role": "user", "content": blocks}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "t_pack", "strict": True, "schema": pack_schema(item)},
        },
        **extra,
    }


def parse(body: dict[str, Any]) -> Any:
    return parse_chat_request(body, seed=0, max_output_tokens=16_384)


# --- service_tier ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("tier", "served"),
    [(None, "default"), ("auto", "default"), ("default", "default"), ("scale", "default"),
     ("flex", "flex"), ("priority", "priority"), ("fast", "priority")],
)  # fmt: skip
def test_service_tier_values(tier: str | None, served: str) -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
    if tier is not None:
        body["service_tier"] = tier
    request = parse(body)
    assert request.service_tier == tier and request.flex == (tier == "flex")
    answer = answer_chat(request, AnswerContext(seed=0, now=0))
    assert answer.body["service_tier"] == served == answer.service_tier
    assert served_tier(tier, batch=True) == "default"


@pytest.mark.parametrize(("value", "code"), [("turbo", "invalid_value"), (3, "invalid_type")])
def test_bad_service_tier(value: Any, code: str) -> None:
    with pytest.raises(EmulatedError) as caught:
        parse({"model": "m", "messages": [{"role": "user", "content": "hi"}], "service_tier": value})
    assert caught.value.status == 400 and caught.value.code == code and caught.value.param == "service_tier"


def test_tier_does_not_change_the_content() -> None:
    body: dict[str, Any] = {"model": "m", "messages": [{"role": "user", "content": "Invoices are late."}]}
    plain = answer_chat(parse(body), AnswerContext(seed=0, now=0))
    flex = answer_chat(parse({**body, "service_tier": "flex"}), AnswerContext(seed=0, now=0))
    assert plain.body["choices"] == flex.body["choices"]


def test_new_fault_fields_are_validated() -> None:
    with pytest.raises(ValidationError):
        FaultConfig(flex_unavailable_rate=1.5)
    with pytest.raises(ValidationError):
        FaultConfig(pack_drop=-1)
    assert FaultConfig().flex_latency_s == 0.05 and FaultConfig().flex_retry_after_s is None


# --- prompt cache ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shared", "cached"),
    [(0, 0), (1023, 0), (1024, 1024), (1151, 1024), (1152, 1152), (1500, 1408), (2047, 1920)],
)
def test_cache_grid(shared: int, cached: int) -> None:
    assert cacheable_length(shared) == cached


def test_prompt_token_ids_match_the_token_count() -> None:
    messages: list[dict[str, Any]] = [
        {"role": "system", "content": "You triage notes. " * 50},
        {"role": "user", "content": [{"type": "text", "text": "part one"}, {"type": "text", "text": "two"}]},
        {"role": "assistant", "content": None},
    ]
    assert len(prompt_token_ids(messages)) == count_chat_tokens(messages)


def _messages(system: str, user: str) -> list[dict[str, Any]]:
    return [{"role": "system", "content": system}, {"role": "user", "content": user}]


SYSTEM = " ".join(f"Rule {i}: be brief and factual." for i in range(250))  # ~2,000 tokens


def test_prompt_cache_prefix_model_schema_and_ttl() -> None:
    now = [0.0]
    cache = PromptCache(ttl_s=600, max_entries=10_000, clock=lambda: now[0])
    first = _messages(SYSTEM, "one")
    tokens = count_chat_tokens(first)
    assert tokens > 1900
    assert cache.cached_tokens("m", "", first, tokens) == 0
    # Identical prompt: everything up to the last grid boundary.
    assert cache.cached_tokens("m", "", first, tokens) == cacheable_length(tokens)
    second = _messages(SYSTEM, "a different question")
    shared = cache.cached_tokens("m", "", second, count_chat_tokens(second))
    assert 1024 <= shared <= count_chat_tokens(_messages(SYSTEM, "")) and (shared - 1024) % 128 == 0
    assert cache.cached_tokens("other-model", "", first, tokens) == 0
    assert cache.cached_tokens("m", '{"type":"json_object"}', first, tokens) == 0
    short = _messages("short", "prompt")
    assert cache.cached_tokens("m", "", short, count_chat_tokens(short)) == 0
    now[0] += 601
    assert cache.cached_tokens("m", "", first, tokens) == 0


def test_prompt_cache_memory_is_bounded() -> None:
    cache = PromptCache(ttl_s=600, max_entries=20, clock=lambda: 0.0)
    for i in range(10):
        messages = _messages(f"{i} " + SYSTEM, "x")
        cache.cached_tokens("m", "", messages, count_chat_tokens(messages))
        assert len(cache) <= 20
    # The oldest prompts were evicted, the newest is still there.
    newest = _messages("9 " + SYSTEM, "x")
    oldest = _messages("0 " + SYSTEM, "x")
    assert cache.cached_tokens("m", "", newest, count_chat_tokens(newest)) > 0
    assert cache.cached_tokens("m", "", oldest, count_chat_tokens(oldest)) == 0


def test_answer_reports_cached_tokens_from_the_context() -> None:
    seen: list[tuple[str, str, int]] = []

    def cache(model: str, key: str, messages: list[dict[str, Any]], tokens: int) -> int:
        seen.append((model, key, tokens))
        return 1152

    request = parse({"model": "m", "messages": _messages(SYSTEM, "q")})
    answer = answer_chat(request, AnswerContext(seed=0, now=0, prompt_cache=cache))
    assert answer.body["usage"]["prompt_tokens_details"] == {"cached_tokens": 1152, "audio_tokens": 0}
    assert answer.cached_tokens == 1152 and seen == [("m", "", request.prompt_tokens)]


# --- packs -----------------------------------------------------------------------------------------


def test_pack_schema_shape() -> None:
    assert item_schema_of(pack_schema({"type": "string"})) == (True, {"type": "string"})
    assert item_schema_of(pack_schema(ITEM_SCHEMA)) == (True, ITEM_SCHEMA)
    not_packs: list[Any] = [
        ITEM_SCHEMA,
        {"type": "object", "properties": {"answers": {"type": "string"}}},
        {"type": "object", "properties": {"answers": {"type": "array", "items": ITEM_SCHEMA}}},
        {**pack_schema(ITEM_SCHEMA), "properties": {"answers": {}, "extra": {}}},
    ]
    for schema in not_packs:
        assert item_schema_of(schema) == (False, None)


def test_pack_items_are_read_in_order() -> None:
    text = '<item id="x-1">\nfirst text\nsecond line\n</item>\n\n<item id="y:2">\nother\n</item>'
    pack = detect_pack(pack_schema({"type": "string"}), text)
    assert pack is not None
    assert [(i.key, i.text) for i in pack.items] == [("x-1", "first text\nsecond line"), ("y:2", "other")]
    assert detect_pack(ITEM_SCHEMA, text) is None


def test_packed_answer_per_id_and_drop() -> None:
    items = {"k1": "The build is broken on main. Tests fail.", "k2": "How do I reset my password?"}
    request = parse(pack_body(items, ITEM_SCHEMA))
    assert request.pack is not None
    answer = answer_chat(request, AnswerContext(seed=0, now=0))
    value = json.loads(answer.body["choices"][0]["message"]["content"])
    jsonschema.validate(value, pack_schema(ITEM_SCHEMA))
    assert [a["id"] for a in value["answers"]] == ["k1", "k2"]
    assert answer.packed_items == 2 and answer.pack_dropped == 0
    dropped = answer_chat(request, AnswerContext(seed=0, now=0, pack_drop=lambda: 1))
    assert [a["id"] for a in json.loads(dropped.body["choices"][0]["message"]["content"])["answers"]] == [
        "k1"
    ]
    assert dropped.packed_items == 1 and dropped.pack_dropped == 1
    # More than there are answers: an empty list, never an error.
    assert pack_answer(request.pack, seed=0, drop=9).value == {"answers": []}


def test_pack_results_depend_on_the_item_only() -> None:
    a = parse(pack_body({"k": "Shipping is delayed by a week."}, {"type": "string"}))
    b = parse(pack_body({"other": "Unrelated.", "k": "Shipping is delayed by a week."}, {"type": "string"}))
    assert a.pack is not None and b.pack is not None
    result_a = pack_answer(a.pack, seed=0, drop=0).value["answers"][0]["result"]
    result_b = pack_answer(b.pack, seed=0, drop=0).value["answers"][1]["result"]
    assert result_a == result_b and result_a.startswith("Shipping is delayed by a week.")


def test_pack_in_a_batch_line() -> None:
    body = pack_body(
        {"a": "Disk full on db-1.", "b": "Printer jammed."}, {"type": "string"}, service_tier="flex"
    )
    raw = json.dumps({"custom_id": "p", "method": "POST", "url": "/v1/chat/completions", "body": body})
    ctx = AnswerContext(seed=0, now=0, pack_drop=lambda: 1, batch=True)
    result = run_line(
        raw.encode(), "/v1/chat/completions", ctx, unknown_models=frozenset(), line_error_rate=0.0, draw=0.5
    )
    assert result.ok and result.is_pack and result.packed_items == 1 and result.pack_dropped == 1
    response = json.loads(result.line)["response"]["body"]
    assert response["service_tier"] == "default"
    assert json.loads(response["choices"][0]["message"]["content"])["answers"][0]["id"] == "a"
