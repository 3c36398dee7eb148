"""Generate a JSON value that is valid against a JSON Schema, from the input text. PURE.

Covers what Structured Outputs schemas use: ``type`` (also as a list), ``properties``
(all filled, as strict mode does), ``required``, ``additionalProperties``, ``enum``,
``const``, ``minimum``/``maximum`` (and the exclusive forms), ``multipleOf``,
``minItems``/``maxItems``/``uniqueItems``, ``prefixItems``, ``minLength``/``maxLength``,
common ``format`` values, a few simple ``pattern`` shapes, ``anyOf``/``oneOf`` (first
branch), ``allOf`` (merged), and ``$ref`` into ``$defs``/``definitions`` (recursion is
cut at ``max_depth``). String values come from the user's text so outputs look related.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import Any

from .schema_values import format_value, hinted_value, match_pattern, number_bounds
from .synth import first_sentence, focus_text, keywords

_SENTENCE_HINTS = (
    "summary", "description", "text", "explanation", "reason", "content", "body", "abstract",
    "answer", "gist", "comment", "message", "rationale", "details", "justification", "note",
)  # fmt: skip
_SHORT_HINTS = ("title", "name", "subject", "headline", "label", "topic", "category", "heading")

Schema = dict[str, Any]


class SchemaSynthesizer:
    """One generator per answer; ``rng`` makes the choices (enum members, numbers)."""

    def __init__(self, root: Any, *, text: str, rng: random.Random, max_depth: int = 8) -> None:
        self._root = root
        self._rng = rng
        self._max_depth = max_depth
        self._active_refs: list[str] = []
        focus = focus_text(text)
        self._sentence = first_sentence(focus) or "No content was provided."
        self._words = keywords(focus, 12)
        self._by_type: dict[str, Callable[[Schema, str, int, int], Any]] = {
            "object": self._object,
            "array": self._array,
            "string": self._string,
            "integer": self._integer,
            "number": self._number,
            "boolean": lambda *_: self._rng.random() < 0.5,
            "null": lambda *_: None,
        }

    def generate(self) -> Any:
        """A value valid against the root schema."""
        return self._value(self._root, "", 0, 0)

    # --- dispatch -----------------------------------------------------------------------

    def _value(self, schema: Any, name: str, depth: int, index: int) -> Any:
        ref = schema.get("$ref") if isinstance(schema, dict) else None
        if not isinstance(ref, str):
            return self._resolved_value(schema, name, depth, index)
        if ref in self._active_refs:
            # A schema re-entering itself: generate the smallest valid instance from here on.
            depth = max(depth, self._max_depth)
        self._active_refs.append(ref)
        try:
            return self._resolved_value(schema, name, depth, index)
        finally:
            self._active_refs.pop()

    def _resolved_value(self, schema: Any, name: str, depth: int, index: int) -> Any:
        resolved = self._prepare(schema)
        if resolved is None:
            return None
        if "const" in resolved:
            return resolved["const"]
        if isinstance(resolved.get("enum"), list) and resolved["enum"]:
            return self._rng.choice(resolved["enum"])
        for keyword in ("anyOf", "oneOf"):
            branches = resolved.get(keyword)
            if isinstance(branches, list) and branches:
                rest = {k: v for k, v in resolved.items() if k != keyword}
                branch = self._pick_branch(branches, depth)
                # Keep the branch's own "$ref" (if any) so recursion through it is detected.
                merged: Any = _merge(rest, branch) if isinstance(branch, dict) else branch and rest
                return self._value(merged, name, depth, index)
        return self._by_type[self._type_of(resolved, depth)](resolved, name, depth, index)

    def _prepare(self, schema: Any) -> Schema | None:
        """Resolve ``$ref`` chains and merge ``allOf``; ``None`` for the ``false`` schema."""
        if schema is True or schema is None:
            return {}
        if schema is False or not isinstance(schema, dict):
            return None
        current: Schema = schema
        for _ in range(32):
            ref = current.get("$ref")
            if not isinstance(ref, str):
                break
            siblings = {k: v for k, v in current.items() if k != "$ref"}
            target = self._lookup(ref)
            current = _merge(target, siblings) if siblings else target
        all_of = current.get("allOf")
        if isinstance(all_of, list):
            merged: Schema = {k: v for k, v in current.items() if k != "allOf"}
            for part in all_of:
                prepared = self._prepare(part)
                if prepared:
                    merged = _merge(merged, prepared)
            current = merged
        return current

    def _lookup(self, ref: str) -> Schema:
        if not ref.startswith("#"):
            return {}
        node: Any = self._root
        for raw in ref[1:].split("/"):
            if not raw:
                continue
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                return {}
        return node if isinstance(node, dict) else {}

    def _pick_branch(self, branches: list[Any], depth: int) -> Any:
        # Deep inside a recursive schema, prefer the branch that ends the recursion.
        if depth >= self._max_depth:
            for branch in branches:
                if isinstance(branch, dict) and branch.get("type") == "null":
                    return branch
        return branches[0]

    def _type_of(self, schema: Schema, depth: int) -> str:
        declared = schema.get("type")
        if isinstance(declared, list):
            concrete = [t for t in declared if t != "null" and t in self._by_type]
            if not concrete or (depth >= self._max_depth and "null" in declared):
                return "null"
            return str(concrete[0])
        if isinstance(declared, str) and declared in self._by_type:
            return declared
        if {"properties", "additionalProperties", "required"} & schema.keys():
            return "object"
        if {"items", "prefixItems"} & schema.keys():
            return "array"
        if {"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"} & schema.keys():
            return "number"
        return "string"

    # --- containers -----------------------------------------------------------------------

    def _object(self, schema: Schema, name: str, depth: int, index: int) -> dict[str, Any]:
        properties: dict[str, Any] = _dict_or_empty(schema.get("properties"))
        required = [r for r in schema.get("required", []) if isinstance(r, str)]
        extra = schema.get("additionalProperties", True)
        extra_schema: Any = {} if extra is True else extra
        out: dict[str, Any] = {}
        for prop, sub in properties.items():
            if depth >= self._max_depth and prop not in required:
                continue
            out[prop] = self._value(sub, prop, depth + 1, index)
        for prop in required:
            if prop not in out:
                out[prop] = self._value(extra_schema if extra is not False else {}, prop, depth + 1, 0)
        wanted = int(schema.get("minProperties", 0))
        if not properties and isinstance(extra, dict) and depth < self._max_depth:
            wanted = max(wanted, 2)  # a map type: show a couple of entries
        position = 0
        while len(out) < wanted and extra is not False and position < wanted + len(self._words):
            key = self._words[position % len(self._words)] + (
                "" if position < len(self._words) else str(position)
            )
            position += 1
            if key not in out:
                out[key] = self._value(extra_schema, key, depth + 1, position)
        return out

    def _array(self, schema: Schema, name: str, depth: int, index: int) -> list[Any]:
        raw_prefix = schema.get("prefixItems")
        prefix: list[Any] = raw_prefix if isinstance(raw_prefix, list) else []
        items = schema.get("items", {})
        low = int(schema.get("minItems", 0))
        high = schema.get("maxItems")
        count = low if depth >= self._max_depth else max(low, len(prefix), 3 if depth < 2 else 2)
        if items is False:
            count = min(count, len(prefix))
        if isinstance(high, int):
            count = min(count, high)
        unique = bool(schema.get("uniqueItems"))
        out: list[Any] = []
        seen: set[str] = set()
        attempt = 0
        while len(out) < count and attempt < count * 4 + 4:
            position = len(out)
            sub = prefix[position] if position < len(prefix) else items
            value = self._value(sub, name, depth + 1, attempt)
            attempt += 1
            marker = repr(value)
            if unique and marker in seen:
                continue
            seen.add(marker)
            out.append(value)
        return out

    # --- scalars --------------------------------------------------------------------------

    def _string(self, schema: Schema, name: str, depth: int, index: int) -> str:
        lowered = name.lower()
        value = format_value(str(schema.get("format", "")), self._word(index), self._rng)
        if value is None:
            value = hinted_value(lowered, self._word(index), self._rng)
        if value is None:
            if any(h in lowered for h in _SENTENCE_HINTS):
                value = self._sentence if index == 0 else f"Details about {self._word(index)}."
            elif any(h in lowered for h in _SHORT_HINTS):
                head = self._sentence.rstrip(".!?").split()[:5]
                value = (
                    " ".join(head) if index == 0 else f"{self._word(index)} {self._word(index + 1)}".title()
                )
            else:
                value = self._word(index)
        pattern = schema.get("pattern")
        if isinstance(pattern, str):
            value = match_pattern(pattern, value, self._words)
        return self._fit_length(value, schema)

    def _fit_length(self, value: str, schema: Schema) -> str:
        low = int(schema.get("minLength", 0))
        high = schema.get("maxLength")
        if len(value) < low and len(self._sentence) > len(value):
            value = self._sentence
        position = 0
        while len(value) < low:
            value = f"{value} {self._word(position)}".strip()
            position += 1
        if isinstance(high, int) and len(value) > high:
            value = value[:high].rstrip() if high > 0 else ""
            value = value.ljust(min(low, high), "x")
        return value

    def _word(self, index: int) -> str:
        return self._words[index % len(self._words)]

    def _integer(self, schema: Schema, name: str, depth: int, index: int) -> int:
        low, high = number_bounds(schema, name, integer=True)
        step = schema.get("multipleOf")
        if isinstance(step, int | float) and step > 0:
            first, last = math.ceil(low / step), math.floor(high / step)
            if first <= last:
                return int(self._rng.randint(first, last) * step)
        return self._rng.randint(int(low), int(high)) if low <= high else int(low)

    def _number(self, schema: Schema, name: str, depth: int, index: int) -> float | int:
        low, high = number_bounds(schema, name, integer=False)
        step = schema.get("multipleOf")
        if isinstance(step, int | float) and step > 0:
            first, last = math.ceil(low / step), math.floor(high / step)
            if first <= last:
                decimals = max(0, -math.floor(math.log10(step))) if step < 1 else 0
                return round(self._rng.randint(first, last) * step, decimals + 2)
        if high <= low:
            return low
        raw = low + (high - low) * self._rng.uniform(0.1, 0.9)
        rounded = round(raw, 2)
        return rounded if low < rounded < high else raw


def _dict_or_empty(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _merge(base: Schema, extra: Schema) -> Schema:
    """Shallow merge of two schemas; ``properties`` and ``required`` are unioned."""
    merged = dict(base)
    for key, value in extra.items():
        if key == "properties" and isinstance(value, dict):
            merged["properties"] = {**merged.get("properties", {}), **value}
        elif key == "required" and isinstance(value, list):
            merged["required"] = list(dict.fromkeys([*merged.get("required", []), *value]))
        else:
            merged[key] = value
    return merged
