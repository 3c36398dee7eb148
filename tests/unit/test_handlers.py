"""Handlers: request bodies, answer parsing and the TOML registry."""

from __future__ import annotations

import json

import jsonschema
import pytest

from handlers import HandlerConfigError, build_registry
from service.core.errors import BadItemError, InvalidOutputError
from service.core.items import Item

REG = build_registry({}, chat_model="gpt-4o-mini", embedding_model="text-embedding-3-small")


def chat_response(content: str | None, finish: str = "stop", refusal: str | None = None) -> dict:
    return {
        "choices": [
            {
                "message": {"role": "assistant", "content": content, "refusal": refusal},
                "finish_reason": finish,
            }
        ],
        "usage": {"prompt_tokens": 10, "completion_tokens": 5},
    }


def test_six_builtins() -> None:
    assert set(REG) == {"summarize", "classify", "extract", "tags", "sentiment", "embed"}
    assert REG["embed"].is_embedding
    for name, spec in REG.items():
        if not spec.is_embedding:
            assert isinstance(spec.output, dict), name
            jsonschema.Draft202012Validator.check_schema(spec.output)


def test_structured_body_uses_json_schema_response_format() -> None:
    body = REG["tags"].build_body(Item(id="1", handler="tags", text="hello"))
    assert body["model"] == "gpt-4o-mini"
    assert body["max_completion_tokens"] == 80
    assert body["response_format"]["type"] == "json_schema"
    assert body["response_format"]["json_schema"]["schema"]["required"] == ["tags"]
    assert body["messages"][-1] == {
        "role": "user",
        "content": "Give one to eight short lowercase tags for the following text.\n\nhello",
    }
    legacy = REG["tags"].build_body(Item(id="1", handler="tags", text="x"), max_tokens_param="max_tokens")
    assert "max_tokens" in legacy and "max_completion_tokens" not in legacy


def test_parse_validates_against_schema() -> None:
    spec = REG["sentiment"]
    assert spec.parse(chat_response('{"sentiment": "positive", "score": 0.5}')) == {
        "sentiment": "positive",
        "score": 0.5,
    }
    with pytest.raises(InvalidOutputError) as bad:
        spec.parse(chat_response('{"sentiment": "ecstatic", "score": 0.5}'))
    assert bad.value.code == "invalid_output"
    with pytest.raises(InvalidOutputError) as not_json:
        spec.parse(chat_response("I think it is positive"))
    assert not_json.value.code == "invalid_output"
    with pytest.raises(InvalidOutputError) as cut:
        spec.parse(chat_response('{"sentiment": "pos', finish="length"))
    assert cut.value.code == "output_truncated"
    with pytest.raises(InvalidOutputError) as refused:
        spec.parse(chat_response(None, refusal="I can't help with that"))
    assert refused.value.code == "refused"


def test_embedding_parse() -> None:
    out = REG["embed"].parse({"data": [{"embedding": [0.1, 0.2, 0.3], "index": 0}]})
    assert out == {"embedding": [0.1, 0.2, 0.3], "dimensions": 3}
    body = REG["embed"].build_body(Item(id="1", handler="embed", text="vec me"))
    assert body == {"model": "text-embedding-3-small", "input": "vec me"}


def test_toml_text_handler_with_fields() -> None:
    reg = build_registry(
        {
            "gist": {
                "system": "One sentence.",
                "prompt": "Summarise the note titled {title}:\n\n{text}",
                "output": "text",
                "max_output_tokens": 200,
            }
        },
        chat_model="gpt-4o-mini",
        embedding_model="e",
    )
    spec = reg["gist"]
    body = spec.build_body(Item(id="1", handler="gist", text="body", fields={"title": "Q3"}))
    assert "response_format" not in body
    assert body["messages"][0] == {"role": "system", "content": "One sentence."}
    assert body["messages"][1]["content"] == "Summarise the note titled Q3:\n\nbody"
    assert spec.parse(chat_response("  A gist.  ")) == "A gist."
    with pytest.raises(BadItemError) as missing:
        spec.build_body(Item(id="1", handler="gist", text="body"))
    assert missing.value.code == "missing_template_field"


def test_override_builtin_model_only() -> None:
    reg = build_registry(
        {"summarize": {"model": "gpt-4.1-mini"}}, chat_model="gpt-4o-mini", embedding_model="e"
    )
    assert reg["summarize"].model == "gpt-4.1-mini"
    assert reg["summarize"].output == REG["summarize"].output


@pytest.mark.parametrize(
    ("table", "key"),
    [
        ({"bad": {"prompt": "{text"}}, "handlers.bad.prompt"),
        ({"bad": {"prompt": "{0}"}}, "handlers.bad.prompt"),
        ({"bad": {"promt": "x"}}, "handlers.bad.promt"),
        ({"bad": {"output": "yaml"}}, "handlers.bad.output"),
        ({"bad": {"output": {"type": "nonsense"}}}, "handlers.bad"),
        ({"bad.name": {}}, "handlers.bad.name"),
    ],
)
def test_bad_handler_tables_name_the_key(table: dict, key: str) -> None:
    with pytest.raises(HandlerConfigError) as info:
        build_registry(table, chat_model="m", embedding_model="e")
    assert info.value.key == key


def test_structured_toml_handler() -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
        "additionalProperties": False,
    }
    reg = build_registry({"where": {"output": schema}}, chat_model="m", embedding_model="e")
    assert reg["where"].parse(chat_response(json.dumps({"city": "Kyoto"}))) == {"city": "Kyoto"}


def test_strict_only_when_the_schema_allows_it() -> None:
    loose = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "note": {"type": "string"}},
        "required": ["city"],
    }
    reg = build_registry(
        {"loose": {"output": loose}, "forced": {"output": loose, "strict": False}},
        chat_model="m",
        embedding_model="e",
    )
    item = Item(id="1", handler="loose", text="x")
    assert reg["loose"].build_body(item)["response_format"]["json_schema"]["strict"] is False
    assert REG["extract"].build_body(item)["response_format"]["json_schema"]["strict"] is True
    assert all(spec.use_strict for spec in REG.values() if not spec.is_embedding)
