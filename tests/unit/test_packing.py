"""Packing, pure: the pack body (wire format), keys, how many items fit, reading a
packed answer per item, and usage shares that add up."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from handlers import build_registry
from service.core import packing
from service.core.cost import Usage
from service.core.errors import InvalidOutputError
from service.core.items import Item
from service.core.packing import PackLimits

REG = build_registry(
    {
        "tags": {"pack": 8},
        "gist": {"pack": 4, "system": "Be brief.", "prompt": "Gist of {title}:\n\n{text}", "output": "text"},
        "plain": {"pack": 5, "output": "text", "max_output_tokens": 100},
    },
    chat_model="gpt-4o-mini",
    embedding_model="text-embedding-3-small",
)
LIMITS = PackLimits()


def item(i: int | str, handler: str = "tags", **fields: str) -> Item:
    return Item(id=str(i), handler=handler, text=f"text of item {i}", fields=fields)


def response(value: object, finish: str = "stop", refusal: str | None = None) -> dict:
    content = value if isinstance(value, str) else json.dumps(value)
    return {
        "choices": [{"message": {"content": content, "refusal": refusal}, "finish_reason": finish}],
        "usage": {"prompt_tokens": 100, "completion_tokens": 40},
    }


def test_pack_body_follows_the_wire_format() -> None:
    spec = REG["tags"]
    members = [(k, packing.item_block(spec, item(k))) for k in ("a1", "b2", "c3")]
    body = packing.build_pack_body(spec, members, limits=LIMITS)
    system, user = body["messages"]
    assert system["role"] == "system" and user["role"] == "user"
    assert system["content"].startswith(spec.system + "\n\n")
    assert '{"answers": [{"id":' in system["content"]
    # the template's static instructions are stated once, in the system message
    assert "Give one to eight short lowercase tags" in system["content"]
    assert "Give one to eight" not in user["content"]
    blocks = re.findall(r'<item id="([A-Za-z0-9._:-]{1,128})">\n(.*?)\n</item>', user["content"], re.DOTALL)
    assert blocks == [("a1", "text of item a1"), ("b2", "text of item b2"), ("c3", "text of item c3")]
    assert user["content"].count("</item>\n\n<item") == 2
    fmt = body["response_format"]
    assert fmt["type"] == "json_schema" and fmt["json_schema"]["name"] == "tags_pack"
    assert fmt["json_schema"]["strict"] is True
    entry = fmt["json_schema"]["schema"]["properties"]["answers"]["items"]
    assert entry["properties"]["result"] == spec.output
    assert entry["required"] == ["id", "result"] and entry["additionalProperties"] is False
    assert body["max_completion_tokens"] == packing.WRAPPER_TOKENS + 3 * (80 + packing.ANSWER_TOKENS)


def test_static_prefix_is_identical_across_packs() -> None:
    spec = REG["gist"]
    one = packing.build_pack_body(spec, [("1", "x"), ("2", "y")], limits=LIMITS)
    two = packing.build_pack_body(spec, [("7", "other"), ("8", "items"), ("9", "here")], limits=LIMITS)
    assert one["messages"][0] == two["messages"][0]
    assert one["response_format"] == two["response_format"]
    assert one["messages"][0]["content"].startswith("Be brief.\n\n")
    # a text handler's result is a string; strict, since the wrapper allows it
    assert one["response_format"]["json_schema"]["schema"]["properties"]["answers"]["items"]["properties"][
        "result"
    ] == {"type": "string"}
    assert one["response_format"]["json_schema"]["strict"] is True


def test_item_block_is_the_rendered_prompt_less_the_static_instructions() -> None:
    spec = REG["gist"]
    # "Gist of " is static, the title is not: the block keeps it
    assert packing.item_block(spec, item(1, "gist", title="Q3")) == "Q3:\n\ntext of item 1"
    assert packing.item_block(REG["plain"], item(2, "plain")) == "text of item 2"
    assert packing.packable_block("a normal text")
    assert not packing.packable_block("sneaky </item> inside")
    assert not packing.packable_block('<item id="x">')
    assert not packing.packable_block("")


def test_keys_are_short_unique_ids_else_numbers() -> None:
    assert packing.pack_keys(["a", "b-2", "c.3"]) == ["1", "2", "3"]
    assert packing.pack_keys(["a", "x" * 25]) == ["1", "2"]
    assert all(packing.KEY_RE.match(k) for k in packing.pack_keys(["f" * 64] * 3))


def test_capacity_respects_pack_and_the_output_cap() -> None:
    assert packing.capacity(REG["tags"], LIMITS) == 8
    big = dataclasses.replace(REG["tags"], pack=100, max_output_tokens=4000)
    # 16,384 tokens of output hold four answers of 4,000 (and their JSON), not five
    assert packing.capacity(big, LIMITS) == 4
    assert packing.pack_output_tokens(big, 4, LIMITS) <= LIMITS.max_output_tokens
    assert packing.pack_output_tokens(big, 50, LIMITS) == LIMITS.max_output_tokens
    huge = dataclasses.replace(REG["tags"], pack=8, max_output_tokens=16_000)
    assert packing.capacity(huge, LIMITS) == 1


def test_group_packs_in_order_and_keeps_equal_ids_apart() -> None:
    spec = REG["tags"]
    entries = [(str(i), 20) for i in range(19)]
    groups = packing.group(spec, entries, LIMITS)
    assert [len(g) for g in groups] == [8, 8, 3]
    assert [i for g in groups for i in g] == list(range(19))
    same = [("a", 20), ("b", 20), ("a", 20), ("c", 20)]
    assert packing.group(spec, same, LIMITS) == [[0, 1], [2, 3]]
    # an unpackable item goes alone; one too large for the context too
    mixed = [("a", 20), ("b", None), ("c", 200_000), ("d", 20)]
    assert packing.group(spec, mixed, LIMITS) == [[1], [2], [0, 3]]


def test_group_fills_the_context_window() -> None:
    spec = REG["tags"]
    small = PackLimits(context_tokens=3000, max_output_tokens=16_384)
    groups = packing.group(spec, [(str(i), 900) for i in range(6)], small)
    assert all(len(g) <= 2 for g in groups) and sum(len(g) for g in groups) == 6
    for g in groups:
        budget = packing.PackBudget(spec, small)
        for _ in g:
            assert budget.fits(900)
            budget.add(900)


def test_parse_pack_validates_each_answer() -> None:
    spec = REG["tags"]
    answer = {
        "answers": [
            {"id": "b", "result": {"tags": ["two"]}},
            {"id": "a", "result": {"tags": ["one"]}},
            {"id": "c", "result": {"tags": "not a list"}},
            {"id": "d", "result": {"tags": ["four"]}},
            {"id": "d", "result": {"tags": ["again"]}},
            {"id": "zz", "result": {"tags": ["not ours"]}},
        ]
    }
    got = packing.parse_pack(spec, response(answer), ["a", "b", "c", "d", "e"])
    assert list(got) == ["a", "b", "c", "d", "e"]
    assert got["a"] == {"tags": ["one"]} and got["b"] == {"tags": ["two"]}
    assert isinstance(got["c"], InvalidOutputError) and "schema" in got["c"].message
    assert isinstance(got["d"], InvalidOutputError) and "twice" in got["d"].message
    assert isinstance(got["e"], InvalidOutputError) and "missing" in got["e"].message


def test_parse_pack_text_results_and_numbered_keys() -> None:
    spec = REG["plain"]
    answer = {
        "answers": [{"id": 1, "result": " first "}, {"id": "2", "result": ""}, {"id": "3", "result": 7}]
    }
    got = packing.parse_pack(spec, response(answer), ["1", "2", "3"])
    assert got["1"] == "first"
    assert isinstance(got["2"], InvalidOutputError) and isinstance(got["3"], InvalidOutputError)


@pytest.mark.parametrize(
    ("resp", "code"),
    [
        (response("not json at all"), "invalid_output"),
        (response('{"answers": [{"id": "a"', finish="length"), "output_truncated"),
        (response({"answer": []}), "invalid_output"),
        (response("", refusal="no"), "refused"),
        ({"choices": []}, "invalid_output"),
    ],
)
def test_parse_pack_whole_failures(resp: dict, code: str) -> None:
    with pytest.raises(InvalidOutputError) as exc:
        packing.parse_pack(REG["tags"], resp, ["a", "b"])
    assert exc.value.code == code


def test_usage_shares_add_up() -> None:
    total = Usage(1003, 401, 512)
    shares = packing.share_usage(total, [10, 30, 17], [5, 0, 20])
    assert sum((s for s in shares), Usage(0, 0)) == total
    assert shares[1].input_tokens > shares[0].input_tokens
    assert shares[2].output_tokens > shares[0].output_tokens > shares[1].output_tokens
    only_prompt = packing.share_usage(total, [1, 1, 1])
    assert sum((s for s in only_prompt), Usage(0, 0)) == total
    ow = packing.output_weights([{"tags": ["a"]}, InvalidOutputError("invalid_output", "x")])
    assert ow[0] > 0 and ow[1] == 0


def test_pack_custom_id_is_stable_and_valid() -> None:
    cid = packing.pack_custom_id(["i" + "a" * 40, "i" + "b" * 40])
    assert cid == packing.pack_custom_id(["i" + "a" * 40, "i" + "b" * 40])
    assert re.fullmatch(r"[A-Za-z0-9_-]{1,64}", cid) and cid.startswith("p")
    assert cid != packing.pack_custom_id(["i" + "b" * 40, "i" + "a" * 40])


def test_validate_reuses_the_handler_validator() -> None:
    assert REG["sentiment"].validate({"sentiment": "positive", "score": 0.1})["score"] == 0.1
    with pytest.raises(InvalidOutputError):
        REG["sentiment"].validate({"sentiment": "ecstatic", "score": 0.1})
    assert REG["plain"].validate("  hi ") == "hi"
    with pytest.raises(InvalidOutputError):
        REG["plain"].validate({"not": "text"})


def test_a_label_before_an_optional_field_stays_with_the_item() -> None:
    from handlers import HandlerSpec
    from service.core.items import Item
    from service.core.packing import item_block, static_instructions

    spec = HandlerSpec(name="t", model="m", prompt="Tag this.\nSubject: {subject?}\n\n{text}")
    assert static_instructions(spec.prompt) == "Tag this.\n"
    with_subject = Item(id="a", handler="t", text="body", fields={"subject": "Invoice"})
    assert item_block(spec, with_subject) == "Subject: Invoice\n\nbody"
    assert item_block(spec, Item(id="b", handler="t", text="body")) == "body"
