"""Pipeline definitions (CONTRACT §14), pure: ``[pipelines.<name>]`` tables checked at
start-up and built into :class:`PipelineSpec` (steps, ``when`` conditions, version). What
an item carries from step to step, and what follows a step, is service/core/chain.py."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from handlers import HandlerSpec

PIPELINE_KEYS = frozenset({"steps", "description"})
STEP_KEYS = frozenset({"handler", "when"})
_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,64}\Z")
_WHEN_RE = re.compile(
    r"""\s*(?P<ref>[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)?)\s*(?P<op>==|!=)\s*"""
    r"""(?P<value>'[^']*'|"[^"]*"|-?\d+(?:\.\d+)?)\s*\Z"""
)


class PipelineConfigError(ValueError):
    """A ``[pipelines.<name>]`` table that cannot be used; ``key`` names it."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class Condition:
    """``<step>.<field> == 'value'`` (or ``!=``, or a number). A step that did not run, a
    text result named with a field, or a field the result lacks has no value: ``==`` is
    false and ``!=`` true for it."""

    step: str
    field: str | None
    op: str
    value: str | int | float
    written: str

    def holds(self, results: Mapping[str, Any]) -> bool:
        equal = self._equal(results)
        return equal if self.op == "==" else not equal

    def _equal(self, results: Mapping[str, Any]) -> bool:
        if self.step not in results:
            return False
        value = results[self.step]
        if self.field is not None:
            if not isinstance(value, dict) or self.field not in value:
                return False
            value = value[self.field]
        if isinstance(self.value, str):
            return isinstance(value, str) and value == self.value
        return isinstance(value, int | float) and not isinstance(value, bool) and value == self.value


def parse_condition(text: Any) -> Condition:
    """Parse a ``when``; ValueError (with what is wrong) when it is not one."""
    if not isinstance(text, str):
        raise ValueError(f"must be a string like \"classify.label == 'complaint'\", got {text!r}")
    match = _WHEN_RE.match(text)
    if match is None:
        raise ValueError(
            f"cannot read {text!r}: write <step>.<field> == 'value' (or !=, or a number), "
            "e.g. \"classify.label == 'complaint'\""
        )
    step, _, name = match["ref"].partition(".")
    raw = match["value"]
    value: str | int | float
    if raw[0] in "'\"":
        value = raw[1:-1]
    else:
        value = float(raw) if "." in raw else int(raw)
    return Condition(step, name or None, match["op"], value, text.strip())


@dataclass(frozen=True)
class Step:
    handler: str
    when: tuple[Condition, ...] = ()  # all must hold (a nested pipeline's and its own)

    def runs(self, results: Mapping[str, Any]) -> bool:
        return all(c.holds(results) for c in self.when)


@dataclass(frozen=True)
class PipelineSpec:
    """A pipeline's steps (a step naming another pipeline is replaced by its steps) and
    its version: the first 12 hex digits of the SHA-256 of its steps, their handlers'
    versions and their conditions. A changed step or condition is a new answer."""

    name: str
    steps: tuple[Step, ...]
    version: str

    @property
    def handlers(self) -> tuple[str, ...]:
        return tuple(s.handler for s in self.steps)


def referenced_handlers(tables: Mapping[str, Any]) -> set[str]:
    """Every name a ``[pipelines.*]`` table lists as a step (handlers and pipelines), read
    leniently: the registry needs them before the pipelines are checked."""
    names: set[str] = set()
    for table in tables.values():
        steps = table.get("steps") if isinstance(table, Mapping) else None
        for step in steps if isinstance(steps, list) else ():
            name = step.get("handler") if isinstance(step, Mapping) else step
            if isinstance(name, str):
                names.add(name)
    return names


def build_pipelines(
    tables: Mapping[str, Any], registry: Mapping[str, HandlerSpec]
) -> dict[str, PipelineSpec]:
    """Check every ``[pipelines.<name>]`` and build it; PipelineConfigError (one message
    naming the key) for an unknown handler, a loop, a step that appears twice, a ``when``
    or a ``{steps.…}`` placeholder that names a step that does not run before, or a field
    its result does not have."""
    for name, table in tables.items():
        key = f"pipelines.{name}"
        if not _NAME_RE.match(name):
            raise PipelineConfigError(key, "a pipeline name is 1-64 letters, digits, '-' and '_'")
        if name in registry:
            raise PipelineConfigError(
                key, f"a handler is named {name!r} too (handlers and pipelines share one namespace)"
            )
        if not isinstance(table, Mapping):
            raise PipelineConfigError(key, "must be a table with a 'steps' list")
        unknown = sorted(set(table) - PIPELINE_KEYS)
        if unknown:
            raise PipelineConfigError(f"{key}.{unknown[0]}", "unknown key (a pipeline has 'steps')")
        steps = table.get("steps")
        if not isinstance(steps, list) or not steps:
            raise PipelineConfigError(f"{key}.steps", "must be a non-empty list of handler names or tables")
    built: dict[str, PipelineSpec] = {}
    for name in tables:
        steps = tuple(_expand(name, tables, registry, (name,)))
        _check(name, steps, registry)
        built[name] = PipelineSpec(name, steps, _version(steps, registry))
    return built


def _expand(
    name: str, tables: Mapping[str, Any], registry: Mapping[str, HandlerSpec], path: tuple[str, ...]
) -> Iterable[Step]:
    for index, entry in enumerate(tables[name]["steps"]):
        key = f"pipelines.{name}.steps[{index}]"
        when: tuple[Condition, ...] = ()
        if isinstance(entry, Mapping):
            unknown = sorted(set(entry) - STEP_KEYS)
            if unknown:
                raise PipelineConfigError(
                    f"{key}.{unknown[0]}", "unknown key (a step has 'handler' and 'when')"
                )
            handler = entry.get("handler")
            if "when" in entry:
                try:
                    when = (parse_condition(entry["when"]),)
                except ValueError as exc:
                    raise PipelineConfigError(f"{key}.when", str(exc)) from None
        else:
            handler = entry
        if not isinstance(handler, str) or not handler:
            raise PipelineConfigError(
                key, f"must name a handler (a string, or a table with 'handler'), got {handler!r}"
            )
        if handler in path:
            loop = " -> ".join((*path[path.index(handler) :], handler))
            raise PipelineConfigError(key, f"{handler!r} makes a loop ({loop})")
        if handler in tables:
            for inner in _expand(handler, tables, registry, (*path, handler)):
                yield Step(inner.handler, when + inner.when)
            continue
        if handler not in registry:
            raise PipelineConfigError(key, f"no handler or pipeline named {handler!r}")
        yield Step(handler, when)


def _check(name: str, steps: tuple[Step, ...], registry: Mapping[str, HandlerSpec]) -> None:
    earlier: dict[str, HandlerSpec] = {}
    for index, step in enumerate(steps):
        key = f"pipelines.{name}.steps[{index}]"
        if step.handler in earlier:
            raise PipelineConfigError(
                key, f"{step.handler!r} runs twice (each step's result is named by its handler)"
            )
        for cond in step.when:
            before = earlier.get(cond.step)
            if before is None:
                raise PipelineConfigError(
                    f"{key}.when",
                    f"{cond.written!r} names {cond.step!r}, "
                    f"which is no step that runs before {step.handler!r}",
                )
            fields = before.result_fields
            if cond.field is not None and fields is None:
                raise PipelineConfigError(
                    f"{key}.when", f"{cond.written!r}: {cond.step!r} gives a text result, which has no fields"
                )
            if cond.field is not None and fields and cond.field not in fields:
                raise PipelineConfigError(
                    f"{key}.when",
                    f"{cond.written!r}: {cond.step!r}'s result has no field {cond.field!r} "
                    f"(it has {', '.join(sorted(fields))})",
                )
        spec = registry[step.handler]
        problem = spec.step_ref_problem(earlier)
        if problem is not None:
            raise PipelineConfigError(key, f"handlers.{step.handler}.prompt: {problem}")
        earlier[step.handler] = spec


def _version(steps: tuple[Step, ...], registry: Mapping[str, HandlerSpec]) -> str:
    canonical = [
        {"handler": s.handler, "version": registry[s.handler].version, "when": [c.written for c in s.when]}
        for s in steps
    ]
    text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:12]
