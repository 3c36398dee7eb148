"""Packed prompts: several items in one chat request, one answer per item id. PURE.

The daemon's wire format (fixed):

- the last user message lists the items as ``<item id="KEY">\\n...text...\\n</item>``
  blocks (separated by a blank line; KEY matches ``[A-Za-z0-9._:-]{1,128}``);
- ``response_format`` is a ``json_schema`` whose root is an object with one property
  ``answers``: an array of objects with ``id`` (string) and ``result`` (ITEM_SCHEMA).

A request is a pack when its schema has that shape. The answer is
``{"answers": [{"id": KEY, "result": ...}, ...]}``, one entry per KEY in prompt order;
each result is generated from that item's own text alone (a text result for
``{"type": "string"}``, else a value valid against ITEM_SCHEMA), so an item gets the same
result whatever it is packed with.

Faults: ``pack_drop`` omits the last N answers; an item whose text holds
``[[emulator:pack_omit]]`` gets no answer, one with ``[[emulator:pack_invalid]]`` gets a
result that is not valid against ITEM_SCHEMA. Both markers are ignored outside packs,
so the daemon's unpacked retry of such an item succeeds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

from .faults import strip_markers
from .schema_synth import SchemaSynthesizer
from .synth import digest, seeded_random, summary_text

ITEM_RE = re.compile(r'<item id="([A-Za-z0-9._:-]{1,128})">\n(.*?)\n</item>', re.DOTALL)
OMIT_MARKER = "[[emulator:pack_omit]]"
INVALID_MARKER = "[[emulator:pack_invalid]]"


@dataclass(frozen=True)
class PackItem:
    key: str
    text: str


@dataclass(frozen=True)
class PackSpec:
    """A detected pack: the item schema and the items, in prompt order."""

    item_schema: Any
    items: tuple[PackItem, ...]


def item_schema_of(schema: Any) -> tuple[bool, Any]:
    """``(True, ITEM_SCHEMA)`` when ``schema`` has the pack shape, else ``(False, None)``."""
    if not isinstance(schema, dict) or schema.get("type") != "object":
        return False, None
    properties = schema.get("properties")
    if not isinstance(properties, dict) or set(properties) != {"answers"}:
        return False, None
    answers = properties["answers"]
    if not isinstance(answers, dict) or answers.get("type") != "array":
        return False, None
    entry = answers.get("items")
    if not isinstance(entry, dict) or entry.get("type") != "object":
        return False, None
    fields = entry.get("properties")
    if not isinstance(fields, dict) or set(fields) != {"id", "result"}:
        return False, None
    id_schema = fields["id"]
    if not isinstance(id_schema, dict) or id_schema.get("type") != "string":
        return False, None
    return True, fields["result"]


def detect_pack(schema: Any, user_text: str) -> PackSpec | None:
    """The pack in a request, or ``None`` when its schema is not a pack schema."""
    is_pack, item_schema = item_schema_of(schema)
    if not is_pack:
        return None
    items = tuple(PackItem(key, text) for key, text in ITEM_RE.findall(user_text))
    return PackSpec(item_schema=item_schema, items=items)


def is_text_schema(schema: Any) -> bool:
    return isinstance(schema, dict) and schema.get("type") == "string" and len(schema) <= 2


def item_result(item_schema: Any, text: str, *, seed: int) -> Any:
    """The result for one item, from its own text only (deterministic per seed)."""
    clean = strip_markers(text)
    schema_key = json.dumps(item_schema, sort_keys=True, ensure_ascii=False, default=str)
    key = digest(str(seed), "pack-item", schema_key, clean)
    if is_text_schema(item_schema):
        return summary_text(clean, key)
    return SchemaSynthesizer(item_schema, text=clean, rng=seeded_random(key)).generate()


def invalid_result(item_schema: Any) -> Any:
    """A value that ITEM_SCHEMA rejects (for ``[[emulator:pack_invalid]]``)."""
    declared = item_schema.get("type") if isinstance(item_schema, dict) else None
    if declared == "string":
        return 12345
    if declared == "array":
        return {"not": "an array"}
    if declared in ("integer", "number", "boolean", "null"):
        return "not the right type"
    return ["not", "an", "object"]


@dataclass(frozen=True)
class PackAnswer:
    value: dict[str, Any]
    answered: int
    dropped: int


def pack_answer(pack: PackSpec, *, seed: int, drop: int) -> PackAnswer:
    """``{"answers": [...]}`` for ``pack``, leaving out the last ``drop`` answers."""
    answers: list[dict[str, Any]] = []
    omitted = 0
    for item in pack.items:
        if OMIT_MARKER in item.text:
            omitted += 1
            continue
        result = (
            invalid_result(pack.item_schema)
            if INVALID_MARKER in item.text
            else item_result(pack.item_schema, item.text, seed=seed)
        )
        answers.append({"id": item.key, "result": result})
    dropped = min(drop, len(answers))
    if dropped:
        answers = answers[: len(answers) - dropped]
    return PackAnswer(value={"answers": answers}, answered=len(answers), dropped=dropped + omitted)
