"""Pure parts of the emulator: synthesis, limits, fault decisions, batch input and lines."""

from __future__ import annotations

import base64
import json
import math
import random
import struct
from typing import Any

import jsonschema
import pytest

from service.emulator import EmulatedError, FaultConfig
from service.emulator.batch_input import validate_batch_input
from service.emulator.batch_output import run_line
from service.emulator.chat import AnswerContext, answer_chat, generate_content, parse_chat_request
from service.emulator.embeddings import answer_embeddings, parse_embedding_request
from service.emulator.errors import mask_api_key
from service.emulator.faults import (
    Markers,
    decide_line_fault,
    decide_sync_fault,
    parse_markers,
    plan_batch_faults,
    strip_markers,
)
from service.emulator.limits import RateLimiter, format_duration
from service.emulator.schema_check import strict_schema_problem
from service.emulator.schema_synth import SchemaSynthesizer
from service.emulator.synth import embedding_vector, encode_embedding, seeded_random, summary_text

TEXT = "The quarterly invoice from Acme Corp is overdue by thirty days. Accounting should follow up today."
CTX = AnswerContext(seed=0, now=1_700_000_000)

# --- schema synthesis ----------------------------------------------------------------------

SCHEMAS: dict[str, dict[str, Any]] = {
    "flat": {
        "type": "object",
        "properties": {"summary": {"type": "string"}, "score": {"type": "number"}, "ok": {"type": "boolean"}},
        "required": ["summary", "score", "ok"],
        "additionalProperties": False,
    },
    "enum_and_const": {
        "type": "object",
        "properties": {
            "sentiment": {"type": "string", "enum": ["positive", "neutral", "negative"]},
            "version": {"const": 2},
            "priority": {"enum": [1, 2, 3]},
        },
        "required": ["sentiment", "version", "priority"],
    },
    "nested": {
        "type": "object",
        "properties": {
            "sender": {
                "type": "object",
                "properties": {"name": {"type": "string"}, "email": {"type": "string", "format": "email"}},
                "required": ["name", "email"],
                "additionalProperties": False,
            },
            "items": {
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": {"label": {"type": "string"}, "qty": {"type": "integer", "minimum": 1}},
                    "required": ["label", "qty"],
                },
                "minItems": 1,
            },
        },
        "required": ["sender", "items"],
    },
    "arrays": {
        "type": "object",
        "properties": {
            "tags": {
                "type": "array",
                "items": {"type": "string"},
                "minItems": 4,
                "maxItems": 5,
                "uniqueItems": True,
            },
            "few": {"type": "array", "items": {"type": "integer"}, "maxItems": 1},
            "empty": {"type": "array", "items": {"type": "string"}, "maxItems": 0},
            "labels": {
                "type": "array",
                "items": {"enum": ["a", "b", "c"]},
                "uniqueItems": True,
                "minItems": 3,
            },
            "pair": {
                "type": "array",
                "prefixItems": [{"type": "string"}, {"type": "integer"}],
                "items": False,
            },
        },
        "required": ["tags", "few", "empty", "labels", "pair"],
    },
    "refs_defs": {
        "type": "object",
        "properties": {
            "who": {"$ref": "#/$defs/person"},
            "others": {"type": "array", "items": {"$ref": "#/$defs/person"}},
        },
        "required": ["who", "others"],
        "$defs": {
            "person": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "age": {"type": "integer", "minimum": 0, "maximum": 120},
                },
                "required": ["name", "age"],
                "additionalProperties": False,
            }
        },
    },
    "refs_definitions": {
        "definitions": {"kind": {"type": "string", "enum": ["bug", "feature"]}},
        "type": "object",
        "properties": {"kind": {"$ref": "#/definitions/kind"}},
        "required": ["kind"],
    },
    "recursive": {
        "type": "object",
        "properties": {"root": {"$ref": "#/$defs/node"}},
        "required": ["root"],
        "$defs": {
            "node": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "children": {"type": "array", "items": {"$ref": "#/$defs/node"}},
                    "parent": {"anyOf": [{"$ref": "#/$defs/node"}, {"type": "null"}]},
                },
                "required": ["name", "children", "parent"],
            }
        },
    },
    "combinators": {
        "type": "object",
        "properties": {
            "any": {"anyOf": [{"type": "integer", "minimum": 5}, {"type": "string"}]},
            "one": {"oneOf": [{"type": "boolean"}, {"type": "string", "maxLength": 3}]},
            "all": {
                "allOf": [
                    {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]},
                    {"properties": {"b": {"type": "integer"}}, "required": ["b"]},
                ]
            },  # fmt: skip
            "nullable": {"type": ["string", "null"]},
        },
        "required": ["any", "one", "all", "nullable"],
    },
    "numbers": {
        "type": "object",
        "properties": {
            "exclusive": {"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
            "int_exclusive": {"type": "integer", "exclusiveMinimum": 3, "exclusiveMaximum": 5},
            "step": {"type": "integer", "minimum": 10, "maximum": 100, "multipleOf": 7},
            "half": {"type": "number", "minimum": 0, "maximum": 10, "multipleOf": 0.5},
            "negative": {"type": "number", "maximum": -50},
            "confidence": {"type": "number"},
        },
        "required": ["exclusive", "int_exclusive", "step", "half", "negative", "confidence"],
    },
    "strings": {
        "type": "object",
        "properties": {
            "long": {"type": "string", "minLength": 80},
            "short": {"type": "string", "maxLength": 4},
            "exact": {"type": "string", "minLength": 6, "maxLength": 6},
            "when": {"type": "string", "format": "date-time"},
            "day": {"type": "string", "format": "date"},
            "id": {"type": "string", "format": "uuid"},
            "site": {"type": "string", "format": "uri"},
            "code": {"type": "string", "pattern": "^[0-9]+$"},
            "title": {"type": "string"},
        },
        "required": ["long", "short", "exact", "when", "day", "id", "site", "code", "title"],
    },
    "maps": {
        "type": "object",
        "properties": {
            "counts": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}}
        },
        "required": ["counts"],
        "additionalProperties": False,
    },
    "untyped": {"properties": {"anything": {}, "flag": True}, "required": ["anything", "flag"]},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_synthesized_value_is_valid(name: str, seed: int) -> None:
    schema = SCHEMAS[name]
    value = SchemaSynthesizer(schema, text=TEXT, rng=random.Random(seed)).generate()
    jsonschema.validate(value, schema, format_checker=jsonschema.FormatChecker())


def test_synthesized_strings_come_from_the_input() -> None:
    value = SchemaSynthesizer(SCHEMAS["flat"], text=TEXT, rng=random.Random(0)).generate()
    assert value["summary"] == "The quarterly invoice from Acme Corp is overdue by thirty days."
    tags = SchemaSynthesizer(SCHEMAS["arrays"], text=TEXT, rng=random.Random(0)).generate()["tags"]
    assert tags[:3] == ["quarterly", "invoice", "acme"]


def test_recursion_is_cut() -> None:
    value = SchemaSynthesizer(SCHEMAS["recursive"], text=TEXT, rng=random.Random(0), max_depth=4).generate()
    assert len(json.dumps(value)) < 20_000


# --- chat answers ---------------------------------------------------------------------------


def _chat(content: str, **extra: Any) -> dict[str, Any]:
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": content}], **extra}


def _schema_format(schema: dict[str, Any], strict: bool = False) -> dict[str, Any]:
    return {"type": "json_schema", "json_schema": {"name": "out", "schema": schema, "strict": strict}}


def test_chat_content_is_deterministic_and_seed_dependent() -> None:
    body = _chat(TEXT, response_format=_schema_format(SCHEMAS["enum_and_const"]))
    first = generate_content(parse_chat_request(body, seed=0, max_output_tokens=1000))
    again = generate_content(parse_chat_request(json.loads(json.dumps(body)), seed=0, max_output_tokens=1000))
    assert first == again
    others = {
        generate_content(parse_chat_request(body, seed=s, max_output_tokens=1000)) for s in range(1, 12)
    }
    assert len(others | {first}) > 1


def test_text_answer_summarises_the_longest_paragraph() -> None:
    request = parse_chat_request(_chat(f"Summarise this note:\n\n{TEXT}"), seed=0, max_output_tokens=1000)
    answer = answer_chat(request, CTX)
    content = answer.body["choices"][0]["message"]["content"]
    assert content.startswith("The quarterly invoice from Acme Corp is overdue by thirty days.")
    assert answer.body["usage"]["total_tokens"] == answer.prompt_tokens + answer.completion_tokens
    assert answer.body["choices"][0]["finish_reason"] == "stop"


def test_max_tokens_truncates_with_finish_reason_length() -> None:
    body = _chat(TEXT, max_completion_tokens=5, response_format=_schema_format(SCHEMAS["flat"]))
    answer = answer_chat(parse_chat_request(body, seed=0, max_output_tokens=1000), CTX)
    choice = answer.body["choices"][0]
    assert choice["finish_reason"] == "length"
    assert answer.body["usage"]["completion_tokens"] == 5
    with pytest.raises(json.JSONDecodeError):
        json.loads(choice["message"]["content"])


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"messages": [{"role": "user", "content": "x"}]}, "model", "missing_required_parameter"),
        ({"model": "m"}, "messages", "missing_required_parameter"),
        ({"model": "m", "messages": "hi"}, "messages", "invalid_type"),
        ({"model": 3, "messages": []}, "model", "invalid_type"),
        ({"model": "m", "messages": []}, "messages", "empty_array"),
        (
            {"model": "m", "messages": [{"role": "robot", "content": "x"}]},
            "messages[0].role",
            "invalid_value",
        ),
        (_chat("x", max_tokens=0), "max_tokens", "integer_below_min_value"),
        (_chat("x", max_tokens=10**6), "max_tokens", "invalid_value"),
        (_chat("x", temperature=3), "temperature", "decimal_above_max_value"),
        (_chat("x", response_format={"type": "yaml"}), "response_format.type", "invalid_value"),
        (_chat("x", response_format={"type": "json_object"}), "messages", None),
    ],
)
def test_chat_request_validation(body: dict[str, Any], param: str, code: str | None) -> None:
    with pytest.raises(EmulatedError) as caught:
        parse_chat_request(body, seed=0, max_output_tokens=16_384)
    assert caught.value.status == 400
    assert caught.value.param == param
    assert caught.value.code == code


def test_strict_schema_rules() -> None:
    assert strict_schema_problem(SCHEMAS["flat"]) is None
    assert "additionalProperties" in (strict_schema_problem(SCHEMAS["enum_and_const"]) or "")
    loose = {"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False}
    assert "Missing 'a'" in (strict_schema_problem(loose) or "")
    assert "type" in (strict_schema_problem({"type": "array"}) or "")
    with pytest.raises(EmulatedError) as caught:
        parse_chat_request(
            _chat("x", response_format=_schema_format(loose, strict=True)), seed=0, max_output_tokens=9
        )
    assert caught.value.param == "response_format"


@pytest.mark.parametrize(
    ("marker", "status", "code"),
    [("[[emulator:status=503]]", 503, None), ("[[emulator:context_length]]", 400, "context_length_exceeded")],
)
def test_error_markers(marker: str, status: int, code: str | None) -> None:
    request = parse_chat_request(_chat(f"{TEXT} {marker}"), seed=0, max_output_tokens=100)
    with pytest.raises(EmulatedError) as caught:
        answer_chat(request, CTX)
    assert (caught.value.status, caught.value.code) == (status, code)


def test_content_markers() -> None:
    refusal = answer_chat(
        parse_chat_request(_chat("no [[emulator:refusal]]"), seed=0, max_output_tokens=99), CTX
    )
    message = refusal.body["choices"][0]["message"]
    assert message["content"] is None and message["refusal"]
    body = _chat(f"{TEXT} [[emulator:invalid_json]]", response_format=_schema_format(SCHEMAS["flat"]))
    broken = answer_chat(parse_chat_request(body, seed=0, max_output_tokens=99), CTX)
    content = broken.body["choices"][0]["message"]["content"]
    assert "[[emulator" not in content
    with pytest.raises(json.JSONDecodeError):
        json.loads(content)


def test_context_window() -> None:
    request = parse_chat_request(_chat("word " * 200), seed=0, max_output_tokens=100)
    with pytest.raises(EmulatedError) as caught:
        answer_chat(request, AnswerContext(seed=0, now=0, context_window=100))
    assert caught.value.code == "context_length_exceeded"
    assert caught.value.param == "messages"


# --- embeddings ------------------------------------------------------------------------------


def test_embedding_vectors() -> None:
    a = embedding_vector("invoice overdue at acme", 256, seed=0)
    assert a == embedding_vector("invoice overdue at acme", 256, seed=0)
    assert math.isclose(sum(v * v for v in a), 1.0, rel_tol=1e-5)
    similar = embedding_vector("acme invoice overdue again", 256, seed=0)
    unrelated = embedding_vector("weather forecast for sailing", 256, seed=0)
    assert sum(x * y for x, y in zip(a, similar, strict=True)) > sum(
        x * y for x, y in zip(a, unrelated, strict=True)
    )
    encoded = encode_embedding(a, "base64")
    assert isinstance(encoded, str)
    decoded = list(struct.unpack("<256f", base64.b64decode(encoded)))
    assert decoded == a


def test_embeddings_request() -> None:
    request = parse_embedding_request(
        {"model": "text-embedding-3-large", "input": ["a b", "c"], "dimensions": 8}
    )
    body = answer_embeddings(request, CTX).body
    assert [d["index"] for d in body["data"]] == [0, 1]
    assert len(body["data"][0]["embedding"]) == 8
    assert body["usage"]["prompt_tokens"] == body["usage"]["total_tokens"] > 0
    assert parse_embedding_request({"model": "text-embedding-3-large", "input": "x"}).dimensions == 3072
    assert parse_embedding_request({"model": "m", "input": [1, 2, 3]}).token_counts == [3]
    for bad in (
        {"model": "m", "input": ""},
        {"model": "m", "input": []},
        {"model": "m", "input": "x", "dimensions": 0},
    ):
        with pytest.raises(EmulatedError):
            parse_embedding_request(bad)


# --- limits -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (1, "1s"),
        (17.28, "17.28s"),
        (360, "6m0s"),
        (86.4, "1m26.4s"),
        (3723, "1h2m3s"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


def test_rpm_window_with_fake_clock() -> None:
    limiter = RateLimiter()
    for t in (0.0, 10.0, 20.0):
        assert limiter.check("m", 1, rpm=3, tpm=None, now=t).allowed
    refused = limiter.check("m", 1, rpm=3, tpm=None, now=30.0)
    assert not refused.allowed and refused.kind == "requests"
    assert refused.retry_after_s == pytest.approx(30.0)  # the t=0 request leaves at t=60
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"] == "50s"
    assert not limiter.check("m", 1, rpm=3, tpm=None, now=59.9).allowed
    assert limiter.check("m", 1, rpm=3, tpm=None, now=60.0).allowed
    assert limiter.check("other-model", 1, rpm=3, tpm=None, now=60.0).allowed


def test_tpm_window_with_fake_clock() -> None:
    limiter = RateLimiter()
    assert limiter.check("m", 400, rpm=None, tpm=1000, now=0.0).allowed
    ok = limiter.check("m", 300, rpm=None, tpm=1000, now=5.0)
    assert ok.headers["x-ratelimit-remaining-tokens"] == "300"
    refused = limiter.check("m", 500, rpm=None, tpm=1000, now=10.0)
    assert (refused.allowed, refused.kind, refused.used, refused.requested) == (False, "tokens", 700, 500)
    assert refused.retry_after_s == pytest.approx(50.0)  # freeing the 400 at t=0 is enough
    too_large = limiter.check("m", 5000, rpm=None, tpm=1000, now=10.0)
    assert not too_large.allowed and too_large.retry_after_s is None
    assert limiter.check("m", 500, rpm=None, tpm=1000, now=60.0).allowed


def test_no_limits_means_no_headers() -> None:
    decision = RateLimiter().check("m", 10, rpm=None, tpm=None, now=0.0)
    assert decision.allowed and decision.headers == {}


# --- faults -----------------------------------------------------------------------------------


def test_markers() -> None:
    text = "a [[emulator:status=429]] b [[emulator:refusal]] [[emulator:line_error=boom_1]] [[emulator:nope]]"
    assert parse_markers(text) == Markers(status=429, refusal=True, line_error="boom_1")
    assert parse_markers("plain") == Markers()
    assert strip_markers(text) == "a  b   "


def test_script_then_random_faults() -> None:
    faults = FaultConfig(rate_429=0.2, rate_500=0.1, rate_timeout=0.1)
    assert decide_sync_fault(faults, 0, 0.0).injected is False  # scripted "normal" beats the rates
    assert decide_sync_fault(faults, 503, 0.99).status == 503
    assert decide_sync_fault(faults, -1, 0.99).timeout
    assert decide_sync_fault(faults, None, 0.05).timeout
    assert decide_sync_fault(faults, None, 0.15).status == 429
    assert decide_sync_fault(faults, None, 0.35).status == 500
    assert not decide_sync_fault(faults, None, 0.45).injected


def test_random_faults_are_reproducible_from_the_seed() -> None:
    faults = FaultConfig(rate_429=0.3)

    def sequence(seed: int) -> list[int | None]:
        rng = random.Random(seed)
        return [decide_sync_fault(faults, None, rng.random()).status for _ in range(200)]

    assert sequence(3) == sequence(3)
    assert 40 <= sequence(3).count(429) <= 80


def test_fault_config_rejects_impossible_rates() -> None:
    with pytest.raises(ValueError, match="must be <= 1"):
        FaultConfig(rate_429=0.7, rate_500=0.6)
    with pytest.raises(ValueError):
        FaultConfig(rate429=1)  # type: ignore[call-arg]


def test_batch_fault_plans() -> None:
    assert plan_batch_faults(FaultConfig(), "expire").expire
    assert plan_batch_faults(FaultConfig(batch_fail_validation=True), None).fail_validation
    assert plan_batch_faults(FaultConfig(), "create_500").create_500
    assert not plan_batch_faults(FaultConfig(), "none").expire
    assert decide_line_fault(Markers(line_error="x"), 0.0, 0.5).error_code == "x"
    assert decide_line_fault(Markers(), 0.5, 0.4).status == 500
    assert decide_line_fault(Markers(), 0.5, 0.6).status is None


def test_api_key_masking_never_echoes_the_key() -> None:
    for key in ("sk-abcdefghijklmnopqrstuvwxyz", "sk-short1", "tiny", ""):
        masked = mask_api_key(key)
        assert key not in masked or not key
    assert mask_api_key("sk-abcdefghijklmnopqrstuvwxyz") == "sk-ab****wxyz"


# --- batch input and lines ----------------------------------------------------------------------


def _line(custom_id: str = "a", *, url: str = "/v1/chat/completions", model: str = "m", **body: Any) -> str:
    return json.dumps(
        {
            "custom_id": custom_id,
            "method": "POST",
            "url": url,
            "body": {"model": model, "messages": [{"role": "user", "content": "hi"}], **body},
        }  # fmt: skip
    )


def _validate(*lines: str, max_lines: int = 100) -> list[str]:
    data = ("\n".join(lines) + "\n").encode()
    summary = validate_batch_input(
        data,
        "/v1/chat/completions",
        max_lines=max_lines,
        unknown_models=frozenset({"gone"}),
        count_tokens=True,
    )
    return [e["code"] for e in summary.errors]


def test_batch_input_validation_codes() -> None:
    assert _validate(_line("a"), _line("b")) == []
    assert _validate("{not json", _line("b")) == ["invalid_json_line"]
    assert _validate(_line("a"), _line("a")) == ["duplicate_custom_id"]
    assert _validate(_line("a"), _line("b", url="/v1/embeddings")) == ["url_mismatch"]
    assert _validate(_line("a"), _line("b", model="other")) == ["model_mismatch"]
    assert _validate(_line("a", model="gone")) == ["model_not_found"]
    assert _validate(json.dumps({"custom_id": "a", "url": "/v1/chat/completions", "body": {}})) == [
        "invalid_request"
    ]
    assert _validate(*(_line(str(i)) for i in range(5)), max_lines=4) == ["too_many_tasks"]
    assert _validate("", "  ") == ["empty_file"]
    bom = "\ufeff" + _line("a")
    assert _validate(bom) == ["invalid_json_line"]


def test_batch_input_summary() -> None:
    data = f"{_line('a')}\r\n\n{_line('b')}".encode()
    summary = validate_batch_input(
        data, "/v1/chat/completions", max_lines=10, unknown_models=frozenset(), count_tokens=True
    )
    assert summary.model == "m" and summary.custom_ids == ["a", "b"]
    assert [s[0] for s in summary.spans] == [1, 3]
    assert summary.prompt_tokens > 0
    assert all(json.loads(data[s:e]) for _, s, e in summary.spans)


def test_batch_line_shapes() -> None:
    def run(raw: str, rate: float = 0.0) -> dict[str, Any]:
        result = run_line(
            raw.encode(),
            "/v1/chat/completions",
            CTX,
            unknown_models=frozenset(),
            line_error_rate=rate,
            draw=0.5,
        )
        return dict(json.loads(result.line), ok=result.ok)

    ok = run(_line("a"))
    assert ok["ok"] and ok["response"]["status_code"] == 200 and ok["error"] is None
    assert ok["id"].startswith("batch_req_") and ok["response"]["body"]["object"] == "chat.completion"
    http = run(_line("b", max_tokens=0))
    assert http["response"]["status_code"] == 400 and http["error"] is None
    assert http["response"]["body"]["error"]["param"] == "max_tokens"
    injected = run(_line("c"), rate=0.9)
    assert injected["response"]["status_code"] == 500
    marked = json.loads(_line("d"))
    marked["body"]["messages"][0]["content"] = "x [[emulator:line_error=weird_failure]]"
    non_http = run(json.dumps(marked))
    assert non_http["response"] is None and non_http["error"]["code"] == "weird_failure"


def test_summary_text_is_stable() -> None:
    key = seeded_random("k").randbytes(4)
    assert summary_text(TEXT, key) == summary_text(TEXT, key)
    assert summary_text("", key) == "There is no content to summarise."
