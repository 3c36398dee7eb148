"""Packing (CONTRACT §12), pure: several items of one handler share one provider request.

The wire format (docs/packing.md):

- one system message: the handler's ``system`` (if any), a blank line, then the fixed
  packing instructions, with the handler's static prompt instructions (the template's
  text before its first placeholder) stated once; then one user message listing the
  items, each as ``<item id="KEY">\\n<the item's rendered prompt, less those static
  instructions>\\n</item>``, blocks separated by a blank line. Everything before the
  user message is the same for every pack of a handler, so the provider's automatic
  prompt caching applies to it;
- ``response_format``: a strict-able JSON schema ``{"answers": [{"id", "result"}]}``
  whose ``result`` is ``{"type": "string"}`` for text handlers, else the handler's schema.

Keys: ``1``..``n`` in prompt order, each item's id within its pack (two items with the
same id never share one). Not the items' own ids: every key is written once more in the
answer, and output tokens cost several times input (``"3"`` is one token, an id such as
``mix-00042`` four). Each answer entry is validated like a single answer
(:meth:`HandlerSpec.validate`); a missing, repeated or invalid entry is an error for that
item alone, a whole answer that cannot be read (not JSON, refused, cut off) is an error
for the pack. Time and I/O stay outside: callers decide what to do with the errors.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from handlers import HandlerSpec
from handlers.base import chat_content, schema_name, strict_compatible
from handlers.templates import parse_template
from service.core.cost import Usage, split_usage
from service.core.errors import InvalidOutputError
from service.core.items import Item
from service.core.tokens import count_chat_tokens, count_tokens

KEY_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
# Limits of gpt-4o-mini (and of the emulator): settings packing.context_tokens and
# packing.max_output_tokens set them for the models a deployment uses.
DEFAULT_CONTEXT_TOKENS = 128_000
DEFAULT_MAX_OUTPUT_TOKENS = 16_384
WRAPPER_TOKENS = 16  # {"answers":[ ... ]}
ANSWER_TOKENS = 24  # {"id":"KEY","result": ... }, around each answer (and JSON escaping)
BLOCK_TOKENS = 12  # <item id="KEY">\n ... \n</item> and the blank line
# A block boundary inside an item's text would make its items ambiguous: sent alone.
_TAG_RE = re.compile(r"</?item[\s>]")

PACK_INSTRUCTIONS = (
    'Several items follow, each in its own <item id="..."> block. Answer every item '
    "independently, as if it were the only one: never mix up, merge or compare items. "
    'Return JSON of the form {"answers": [{"id": "<the item\'s id>", "result": <the answer>}]} '
    "with exactly one entry per item id, in the order the items are given."
)
TEXT_RESULT = 'Each "result" is the answer to that item, as a string.'
SCHEMA_RESULT = 'Each "result" is an object valid against the result schema of the response format.'


@dataclass(frozen=True)
class PackLimits:
    """What one pack request may use: the model's context window (prompt + requested
    output) and its largest ``max_output_tokens``."""

    context_tokens: int = DEFAULT_CONTEXT_TOKENS
    max_output_tokens: int = DEFAULT_MAX_OUTPUT_TOKENS


# -- the static part ---------------------------------------------------------------------


@functools.lru_cache(maxsize=256)
def static_instructions(prompt: str) -> str:
    """The template's literal text that every rendering starts with (before its first
    placeholder, cut back to a line break when that placeholder's line may be left out,
    handlers/templates.py): the same for every item, so a pack states it once."""
    return parse_template(prompt).static_prefix


def system_message(spec: HandlerSpec) -> str:
    """The pack's system message: the handler's system, then the packing instructions."""
    parts = [spec.system] if spec.system else []
    instructions = PACK_INSTRUCTIONS + " " + (TEXT_RESULT if spec.output == "text" else SCHEMA_RESULT)
    static = static_instructions(spec.prompt).strip()
    if static:
        instructions += "\n\nInstructions for each item:\n" + static
    parts.append(instructions)
    return "\n\n".join(parts)


def pack_schema(spec: HandlerSpec) -> dict[str, Any]:
    item_schema: Any = {"type": "string"} if spec.output == "text" else spec.output
    return {
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


def pack_strict(spec: HandlerSpec) -> bool:
    """As the handler's strictness; a text handler (which has none) is strict whenever
    the wrapper allows it, as a structured handler left to its default is."""
    if spec.strict is not None:
        return spec.strict
    if isinstance(spec.output, dict):
        return spec.use_strict
    return strict_compatible(pack_schema(spec))


_STATIC_TOKENS: dict[tuple[str, str], int] = {}


def _static_tokens(spec: HandlerSpec) -> int:
    """Prompt tokens of a pack with no items (system message, framing, schema); counted
    once per handler definition (a spec holds dicts, so it is no cache key itself)."""
    key = (spec.name, spec.version)
    if key not in _STATIC_TOKENS:
        _STATIC_TOKENS[key] = _count_static(spec)
    return _STATIC_TOKENS[key]


def _count_static(spec: HandlerSpec) -> int:
    messages = [{"role": "system", "content": system_message(spec)}, {"role": "user", "content": ""}]
    schema = json.dumps(pack_schema(spec), separators=(",", ":"))
    return count_chat_tokens(messages) + count_tokens(schema)


# -- items --------------------------------------------------------------------------------


def item_block(spec: HandlerSpec, item: Item, steps: Mapping[str, Any] | None = None) -> str:
    """What stands inside the item's ``<item>`` block: its rendered prompt, less the
    static instructions the system message already gives. Raises BadItemError (a field
    the template needs is missing), as building its single body does."""
    rendered = spec.render_prompt(item, steps)
    static = static_instructions(spec.prompt)
    if static and rendered.startswith(static):
        rendered = rendered[len(static) :]
    return rendered.strip()


def packable_block(block: str) -> bool:
    """A block whose text holds an item tag would blur the boundaries: sent alone."""
    return bool(block) and _TAG_RE.search(block) is None


def block_tokens(block: str) -> int:
    return count_tokens(block) + BLOCK_TOKENS


def pack_keys(ids: Sequence[str]) -> list[str]:
    """The keys of a pack's items, in order: ``1``..``n`` (the shortest answer keys)."""
    return [str(k) for k in range(1, len(ids) + 1)]


# -- how many items fit -------------------------------------------------------------------


def pack_output_tokens(spec: HandlerSpec, n: int, limits: PackLimits) -> int:
    """``max_output_tokens`` of a pack of ``n``: each item's allowance plus room for the
    JSON around it, capped at the model's largest."""
    return min(limits.max_output_tokens, WRAPPER_TOKENS + n * (spec.max_output_tokens + ANSWER_TOKENS))


def capacity(spec: HandlerSpec, limits: PackLimits) -> int:
    """The most items one pack of the handler may hold: ``pack``, and as many as the
    output cap has room for at their full ``max_output_tokens``."""
    by_output = (limits.max_output_tokens - WRAPPER_TOKENS) // (spec.max_output_tokens + ANSWER_TOKENS)
    return max(1, min(spec.pack, by_output))


class PackBudget:
    """Fills one pack: :meth:`fits` says whether one more item (its block's tokens) still
    fits, within ``capacity`` and with prompt + requested output inside the context."""

    def __init__(self, spec: HandlerSpec, limits: PackLimits) -> None:
        self.spec = spec
        self.limits = limits
        self.capacity = capacity(spec, limits)
        self.static = _static_tokens(spec)
        self.tokens = 0
        self.count = 0

    def fits(self, tokens: int) -> bool:
        n = self.count + 1
        if n > self.capacity:
            return False
        prompt = self.static + self.tokens + tokens
        return prompt + pack_output_tokens(self.spec, n, self.limits) <= self.limits.context_tokens

    def fits_with_another(self, tokens: int) -> bool:
        """Whether an item of ``tokens`` could share a pack at all (with one more item of
        its size): else it is sent alone."""
        if self.capacity < 2:
            return False
        prompt = self.static + 2 * tokens
        return prompt + pack_output_tokens(self.spec, 2, self.limits) <= self.limits.context_tokens

    def add(self, tokens: int) -> None:
        self.tokens += tokens
        self.count += 1

    @property
    def full(self) -> bool:
        return self.count >= self.capacity


def group(
    spec: HandlerSpec, entries: Sequence[tuple[str, int | None]], limits: PackLimits
) -> list[list[int]]:
    """Packs of ``entries`` ((item id, block tokens), or tokens None: cannot be packed),
    in order: greedy, a new pack when the current one is full, would overflow, or has an
    item of the same id. A group of one is sent alone (unpacked)."""
    groups: list[list[int]] = []
    current: list[int] = []
    ids: set[str] = set()
    budget = PackBudget(spec, limits)
    for index, (item_id, tokens) in enumerate(entries):
        if tokens is None or not PackBudget(spec, limits).fits_with_another(tokens):
            groups.append([index])  # cannot be packed, or too large to share a request: alone
            continue
        if current and (item_id in ids or not budget.fits(tokens)):
            groups.append(current)
            current, ids, budget = [], set(), PackBudget(spec, limits)
        current.append(index)
        ids.add(item_id)
        budget.add(tokens)
    if current:
        groups.append(current)
    return groups


# -- the request --------------------------------------------------------------------------


def build_pack_body(
    spec: HandlerSpec,
    members: Sequence[tuple[str, str]],
    *,
    limits: PackLimits,
    max_tokens_param: str = "max_completion_tokens",
) -> dict[str, Any]:
    """The provider request of one pack, from its (key, block) pairs."""
    user = "\n\n".join(f'<item id="{key}">\n{block}\n</item>' for key, block in members)
    body: dict[str, Any] = {
        "model": spec.model,
        "messages": [
            {"role": "system", "content": system_message(spec)},
            {"role": "user", "content": user},
        ],
        max_tokens_param: pack_output_tokens(spec, len(members), limits),
    }
    if spec.temperature is not None:
        body["temperature"] = spec.temperature
    body["response_format"] = {
        "type": "json_schema",
        "json_schema": {
            "name": schema_name(spec.name)[:59] + "_pack",
            "strict": pack_strict(spec),
            "schema": pack_schema(spec),
        },
    }
    return body


def pack_custom_id(member_cids: Sequence[str]) -> str:
    """A batch line's ``custom_id`` for a pack: ``p`` + 40 hex of the SHA-256 of its
    members' custom ids ([A-Za-z0-9_-]{1,64} like theirs, the same on every resubmission)."""
    return "p" + hashlib.sha256("\0".join(member_cids).encode()).hexdigest()[:40]


# -- the answer ---------------------------------------------------------------------------

Answer = Any  # a valid result, or the InvalidOutputError of that item


def parse_pack(spec: HandlerSpec, response: dict[str, Any], keys: Sequence[str]) -> dict[str, Answer]:
    """Read a pack's response into one answer per key: the item's validated result, or
    an InvalidOutputError for that item (missing, answered twice, invalid). Raises
    InvalidOutputError when the whole answer cannot be read (every item goes alone)."""
    content, finish = chat_content(response)
    try:
        value = json.loads(content)
    except json.JSONDecodeError as exc:
        if finish == "length":
            raise InvalidOutputError(
                "output_truncated", "the packed answer hit its max_output_tokens"
            ) from None
        raise InvalidOutputError("invalid_output", f"the packed answer is not JSON: {exc.msg}") from None
    answers = value.get("answers") if isinstance(value, dict) else None
    if not isinstance(answers, list):
        raise InvalidOutputError("invalid_output", "the packed answer has no list of answers")
    found, twice = _entries(spec, answers, set(keys))
    out: dict[str, Answer] = {}
    for key in keys:
        if key in twice:
            out[key] = InvalidOutputError("invalid_output", f"item {key} was answered twice in the pack")
        elif key not in found:
            out[key] = InvalidOutputError("invalid_output", f"item {key} is missing from the packed answer")
        else:
            out[key] = found[key]
    return out


def _entries(spec: HandlerSpec, answers: list[Any], wanted: set[str]) -> tuple[dict[str, Answer], set[str]]:
    """The answer's entries by key (first one of a key), and the keys answered twice;
    entries for keys not in the pack are ignored."""
    found: dict[str, Answer] = {}
    twice: set[str] = set()
    for entry in answers:
        if not isinstance(entry, dict):
            continue
        key = entry.get("id")
        if isinstance(key, int) and not isinstance(key, bool):
            key = str(key)  # a numbered key answered as a number
        if not isinstance(key, str) or key not in wanted:
            continue
        if key in found:
            twice.add(key)
            continue
        found[key] = _entry_result(spec, entry)
    return found, twice


def _entry_result(spec: HandlerSpec, entry: dict[str, Any]) -> Answer:
    if "result" not in entry:
        return InvalidOutputError("invalid_output", "the packed answer has no result for this item")
    try:
        result = spec.validate(entry["result"])
    except InvalidOutputError as exc:
        return exc
    if isinstance(result, str) and not result:
        return InvalidOutputError("invalid_output", "the packed answer for this item is empty")
    return result


# -- usage --------------------------------------------------------------------------------


def output_weights(answers: Sequence[Answer]) -> list[int]:
    """Each item's part of the answer: the length of its result (0 when it has none)."""
    return [
        0 if isinstance(a, InvalidOutputError) else len(json.dumps(a, ensure_ascii=False)) for a in answers
    ]


def share_usage(
    total: Usage, prompt_weights: Sequence[int], out_weights: Sequence[int] | None = None
) -> list[Usage]:
    """Each item's share of one pack request's usage: input (and cached) tokens in
    proportion to its prompt tokens, output tokens to its part of the answer (to its
    prompt tokens when the answer is unknown). The shares add up to ``total`` exactly."""
    inputs = split_usage(total, list(prompt_weights))
    if out_weights is None or not any(out_weights):
        return inputs
    outputs = split_usage(Usage(0, total.output_tokens), list(out_weights))
    return [
        Usage(i.input_tokens, o.output_tokens, i.cached_tokens) for i, o in zip(inputs, outputs, strict=True)
    ]
