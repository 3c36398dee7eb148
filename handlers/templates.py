"""Prompt templates (README "Handlers", docs/templates.md): parsed once, rendered once per
item. Pure.

Syntax: ``{field}`` (an item field, or ``text``), ``{field?}`` (optional: empty when the
item lacks it), ``{steps.<handler>}`` / ``{steps.<handler>.<field>}`` (an earlier pipeline
step's result, or a field of it; ``?`` makes them optional too), ``{{`` / ``}}`` for
literal braces. No format specs, conversions, indexes or positional fields.

A line whose placeholders are all optional and all render empty is left out with its
line break, and when that leaves two blank lines in a row (or a blank line at the start
or end) the extra blank line goes too: ``"Subject: {subject?}"`` costs nothing for an
item without a subject.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

STEPS = "steps"
_FIELD_RE = re.compile(r"[^\W\d][\w-]*\Z")  # a letter or '_', then letters, digits, '_', '-'
_STEP_RE = re.compile(r"[\w-]+\Z")  # a handler name (or a schema property)
_BRACE_RE = re.compile(r"[{}]")
_SCALARS = (str, int, float, bool)


class TemplateError(ValueError):
    """A prompt template that cannot be used (bad braces, a name it cannot hold)."""


class MissingValuesError(LookupError):
    """Required placeholders the render had no value for; ``names`` as written, without
    ``?`` (``subject``, ``steps.classify.label``), sorted."""

    def __init__(self, names: tuple[str, ...]) -> None:
        super().__init__(", ".join(names))
        self.names = names


@dataclass(frozen=True)
class Placeholder:
    """One ``{...}``. ``step`` is set for ``{steps.<step>[.<field>]}``; ``field`` is the
    item field, or the step result's field (None: the step's whole result)."""

    name: str  # as written, without braces and '?': "subject", "steps.extract.people"
    field: str | None
    step: str | None = None
    optional: bool = False

    @property
    def written(self) -> str:
        """The placeholder as the template writes it: ``{steps.classify.label?}``."""
        return "{" + self.name + ("?" if self.optional else "") + "}"

    def value(self, values: Mapping[str, str], steps: Mapping[str, Any] | None) -> str | None:
        """The rendered value, or None when there is none (absent, or null)."""
        if self.step is None:
            return values.get(self.name)
        result = steps.get(self.step) if steps else None
        if self.field is not None:
            result = result.get(self.field) if isinstance(result, dict) else None
        return None if result is None else render_value(result)


def render_value(value: Any) -> str:
    """How a step's result (or a field of it) reads in a prompt: a string as is, a number
    or boolean as in JSON, a list of those joined with ", ", anything else (an object, a
    list holding objects or lists) as compact JSON."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(v, _SCALARS) for v in value):
        return ", ".join(render_value(v) for v in value)
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


Part = str | Placeholder


@dataclass(frozen=True)
class _Line:
    parts: tuple[Part, ...]
    elidable: bool  # holds placeholders, all optional: left out when they all render empty
    blank: bool  # no placeholders, only whitespace
    slots: tuple[int, ...]  # where in ``parts`` the placeholders are


@dataclass(frozen=True)
class Template:
    """A parsed template: :meth:`render` it; the placeholder sets say what it needs."""

    source: str
    placeholders: tuple[Placeholder, ...]
    _lines: tuple[_Line, ...] = field(repr=False)
    _flat: tuple[Part, ...] | None = field(repr=False)  # set when no line can be left out

    @functools.cached_property
    def fields(self) -> frozenset[str]:
        """Item fields named (``text`` included), required or optional."""
        return frozenset(p.field for p in self.placeholders if p.step is None and p.field is not None)

    @functools.cached_property
    def required_fields(self) -> frozenset[str]:
        return frozenset(
            p.field for p in self.placeholders if p.step is None and p.field is not None and not p.optional
        )

    @functools.cached_property
    def step_refs(self) -> tuple[Placeholder, ...]:
        """The ``{steps.…}`` placeholders, in template order (``step``, ``field``, ``optional``)."""
        return tuple(p for p in self.placeholders if p.step is not None)

    @functools.cached_property
    def steps(self) -> frozenset[str]:
        """Names of the earlier steps whose results the template uses."""
        return frozenset(p.step for p in self.step_refs if p.step is not None)

    @functools.cached_property
    def static_prefix(self) -> str:
        """The literal text before the first placeholder that renderings start with, cut
        back to its last line break when the first placeholder's line can be left out
        (``"Intro.\n\nSubject: {subject?}…"`` → ``"Intro.\n\n"``); "" when only whitespace
        comes before it. What a pack of items can state once for all of them (check that
        a rendering starts with it: a template of nothing but the prefix and lines left
        out renders shorter)."""
        prefix = ""
        for line in self._lines:
            if line.slots:
                if not line.elidable:
                    prefix += _literal(line.parts[: line.slots[0]])
                return prefix if prefix.strip() else ""
            prefix += _literal(line.parts) + "\n"
        return ""  # no placeholder at all

    def render(self, values: Mapping[str, str], steps: Mapping[str, Any] | None = None) -> str:
        """Fill the template. ``values``: the item's fields and ``text``; ``steps``: earlier
        steps' results by handler name (a string for a text result, a dict for a structured
        one). Raises :class:`MissingValuesError` naming every required placeholder without
        a value."""
        missing: list[str] = []
        if self._flat is not None:
            out = "".join(_fill(self._flat, values, steps, missing))
        else:
            out = self._render_lines(values, steps, missing)
        if missing:
            raise MissingValuesError(tuple(sorted(set(missing))))
        return out

    def _render_lines(
        self, values: Mapping[str, str], steps: Mapping[str, Any] | None, missing: list[str]
    ) -> str:
        out: list[str] = []
        last_blank = True  # the start counts as a blank line: a run left out there takes the next one
        in_run = run_after_blank = False
        for line in self._lines:
            if line.elidable:
                rendered = _fill(line.parts, values, steps, missing)
                for i in line.slots:
                    if rendered[i]:
                        break
                else:  # every placeholder of the line is empty: leave it out
                    if not in_run:
                        in_run, run_after_blank = True, last_blank
                    continue
                text = "".join(rendered)
            elif line.blank:
                if in_run and run_after_blank:
                    in_run = False
                    continue  # the blank lines around the run merge into the one before it
                text = "".join(_fill(line.parts, values, steps, missing))
            else:
                text = "".join(_fill(line.parts, values, steps, missing))
            in_run = False
            out.append(text)
            last_blank = line.blank
        if in_run and run_after_blank and out and last_blank:
            out.pop()  # a run at the end takes the blank line before it
        return "\n".join(out)


def _literal(parts: tuple[Part, ...]) -> str:
    return "".join(p for p in parts if isinstance(p, str))


def _fill(
    parts: tuple[Part, ...], values: Mapping[str, str], steps: Mapping[str, Any] | None, missing: list[str]
) -> list[str]:
    out: list[str] = []
    for part in parts:
        if isinstance(part, str):
            out.append(part)
            continue
        value = values.get(part.name) if part.step is None else part.value(values, steps)
        if value is None:
            if not part.optional:
                missing.append(part.name)
            value = ""
        out.append(value)
    return out


@functools.lru_cache(maxsize=256)  # templates are few; rendered once per item
def parse_template(source: str) -> Template:
    """Parse a prompt template; raises :class:`TemplateError` with a message saying what
    is wrong and how to write it."""
    parts: list[Part] = []
    literal: list[str] = []
    pos = 0
    for match in _BRACE_RE.finditer(source):
        at = match.start()
        if at < pos:  # consumed as part of '{{', '}}' or a placeholder
            continue
        literal.append(source[pos:at])
        brace = match.group()
        if source.startswith(brace * 2, at):
            literal.append(brace)
            pos = at + 2
            continue
        if brace == "}":
            raise TemplateError(f"a single '}}' at character {at + 1}; write '}}}}' for a literal brace")
        end = source.find("}", at + 1)
        inner_open = source.find("{", at + 1)
        if end == -1:
            raise TemplateError(
                f"the '{{' at character {at + 1} is never closed; write '{{{{' for a literal brace"
            )
        if inner_open != -1 and inner_open < end:
            raise TemplateError(
                f"a '{{' inside the placeholder that starts at character {at + 1}; "
                "placeholders do not nest (write '{{' for a literal brace)"
            )
        if literal:
            parts.append("".join(literal))
            literal = []
        parts.append(_placeholder(source[at + 1 : end]))
        pos = end + 1
    literal.append(source[pos:])
    if "".join(literal):
        parts.append("".join(literal))
    placeholders = tuple(p for p in parts if isinstance(p, Placeholder))
    lines = _lines(parts)
    flat = tuple(parts) if not any(line.elidable for line in lines) else None
    return Template(source, placeholders, lines, flat)


def _placeholder(inner: str) -> Placeholder:
    if not inner:
        raise TemplateError("an empty placeholder {}: name a field, such as {text} or {title}")
    if any(c in inner for c in ":!"):
        raise TemplateError(f"placeholder {{{inner}}} may not carry a format spec or conversion")
    optional = inner.endswith("?")
    name = inner[:-1] if optional else inner
    head, _, rest = name.partition(".")
    if head == STEPS:
        names = rest.split(".") if rest else []
        if not names:
            raise TemplateError(
                f"placeholder {{{inner}}} names no step: write {{steps.<handler>}} or "
                "{steps.<handler>.<field>}"
            )
        if len(names) > 2 or not all(_STEP_RE.match(n) for n in names):
            raise TemplateError(
                f"placeholder {{{inner}}}: a step is named {{steps.<handler>}} or "
                "{steps.<handler>.<field>}, each name letters, digits, '_' and '-' (no deeper fields)"
            )
        return Placeholder(name, names[1] if len(names) == 2 else None, names[0], optional)
    if not _FIELD_RE.match(name):
        raise TemplateError(
            f"placeholder {{{inner}}} must be a plain name such as {{text}} or {{title}} "
            "(letters, digits, '_' and '-', optionally ending in '?'), or {steps.<handler>[.<field>]}"
        )
    return Placeholder(name, name, None, optional)


def _lines(parts: list[Part]) -> tuple[_Line, ...]:
    """The parts cut at line breaks (literal ones: a value's own line breaks never count)."""
    lines: list[list[Part]] = [[]]
    for part in parts:
        if isinstance(part, Placeholder):
            lines[-1].append(part)
            continue
        first, *more = part.split("\n")
        if first:
            lines[-1].append(first)
        for text in more:
            lines.append([text] if text else [])
    out = []
    for line in lines:
        holders = [p for p in line if isinstance(p, Placeholder)]
        elidable = bool(holders) and all(p.optional for p in holders)
        blank = not holders and not "".join(p for p in line if isinstance(p, str)).strip()
        slots = tuple(i for i, p in enumerate(line) if isinstance(p, Placeholder))
        out.append(_Line(tuple(line), elidable, blank, slots))
    return tuple(out)


def template_fields(template: str) -> frozenset[str]:
    """The item fields (``text`` included) a template names, required or optional;
    raises :class:`TemplateError`."""
    return parse_template(template).fields
