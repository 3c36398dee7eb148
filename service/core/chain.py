"""Pipelines (CONTRACT §14), pure: their definitions and start-up checks, the state an
item carries from step to step, and what follows a finished step (the next step's
message, or the pipeline's final ending).

An item fed to a pipeline runs its steps one after the other. Each step is an ordinary
item of the step's handler (routed, buffered, batched, promoted, stored like any), which
carries a :class:`ChainState`: the original item, the intake sequence that started the
pipeline, and the results of the steps done so far. When a step ends, :func:`after_step`
says what comes next:

- :class:`NextStep`: a message for the next step to run (``when`` conditions skip
  steps), published on ``<prefix>.in.<pipeline>`` with ``Nats-Msg-Id``
  ``<id>:<pipeline>:step<k>:<origin seq>`` so that a step that ends twice (a crash
  between its ending and its ack) starts the next step once;
- :class:`Final`: the pipeline's one result event (``ok`` with every step's result, or
  ``error`` naming the failed step in ``error.step``), written like any ending
  (service/core/endings.py) under the intake sequence that started the pipeline.

A step's own answer is stored in the result store under its handler, id and version
before the next step starts, so a step that runs again (after a crash, or a DLQ replay
of the pipeline) is answered from the store and never paid twice.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from handlers import HandlerSpec
from service.core.cost import Usage
from service.core.errors import BadItemError, ErrorInfo
from service.core.events import Outcome, iso

# The key of a step message's envelope (beside "item"); an item fed from outside never
# has it (an item with any other top-level key is refused).
ENVELOPE = "enrichd_pipeline"
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


# -- definitions --------------------------------------------------------------------------


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


# -- the state an item carries ------------------------------------------------------------


@dataclass(frozen=True)
class StepDone:
    """A step that ran and answered, as the final event lists it."""

    handler: str
    result: Any
    route: str | None
    model: str | None
    handler_version: str | None
    batch_id: str | None
    cached: bool
    attempts: int
    usage: dict[str, int] | None
    cost_usd: float | None

    @classmethod
    def from_event(cls, event: Mapping[str, Any]) -> StepDone:
        return cls(
            handler=event["handler"],
            result=event.get("result"),
            route=event.get("route"),
            model=event.get("model"),
            handler_version=event.get("handler_version"),
            batch_id=event.get("batch_id"),
            cached=bool(event.get("cached")),
            attempts=int(event.get("attempts") or 0),
            usage=event.get("usage"),
            cost_usd=event.get("cost_usd"),
        )

    def listing(self) -> dict[str, Any]:
        """The step's entry in the final event's ``steps`` (its result is in ``result``)."""
        return {
            "handler": self.handler,
            "route": self.route,
            "model": self.model,
            "handler_version": self.handler_version,
            "batch_id": self.batch_id,
            "cached": self.cached,
            "attempts": self.attempts,
            "usage": self.usage,
            "cost_usd": self.cost_usd,
        }

    def to_dict(self) -> dict[str, Any]:
        return {**self.listing(), "result": self.result}


@dataclass(frozen=True)
class ChainState:
    """Where one item is in its pipeline: the step it runs now (``index`` into the
    pipeline's steps), the steps done and skipped before it, and what the final event
    needs (the original item, the intake sequence that started the pipeline — None for a
    request on ``enrich.sync`` — and when it arrived)."""

    pipeline: str
    index: int
    item: dict[str, Any]
    origin_seq: int | None
    received_at: str
    done: tuple[StepDone, ...] = ()
    skipped: tuple[str, ...] = ()

    @property
    def results(self) -> dict[str, Any]:
        """The earlier steps' results by handler: what ``{steps.…}`` and ``when`` read."""
        return {d.handler: d.result for d in self.done}

    def handler(self, spec: PipelineSpec) -> str:
        return spec.steps[self.index].handler

    def to_dict(self) -> dict[str, Any]:
        return {
            "pipeline": self.pipeline,
            "index": self.index,
            "origin_seq": self.origin_seq,
            "received_at": self.received_at,
            "done": [d.to_dict() for d in self.done],
            "skipped": list(self.skipped),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], item: dict[str, Any]) -> ChainState:
        try:
            return cls(
                pipeline=str(data["pipeline"]),
                index=int(data["index"]),
                item=item,
                origin_seq=None if data.get("origin_seq") is None else int(data["origin_seq"]),
                received_at=str(data["received_at"]),
                done=tuple(
                    StepDone(**{k: d.get(k) for k in StepDone.__dataclass_fields__})
                    for d in data.get("done", ())
                ),
                skipped=tuple(str(s) for s in data.get("skipped", ())),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise BadItemError("bad_pipeline_state", f"unreadable pipeline step message: {exc}") from None

    def envelope(self) -> dict[str, Any]:
        """The body of this step's message on ``<prefix>.in.<pipeline>``."""
        return {ENVELOPE: self.to_dict(), "item": self.item}


def read_envelope(data: Mapping[str, Any], pipeline: PipelineSpec) -> ChainState | None:
    """The state in a step message's body, None for an item fed from outside."""
    if ENVELOPE not in data:
        return None
    state, item = data.get(ENVELOPE), data.get("item")
    if not isinstance(state, Mapping) or not isinstance(item, dict):
        raise BadItemError(
            "bad_pipeline_state", "a pipeline step message needs 'enrichd_pipeline' and 'item' objects"
        )
    chain = ChainState.from_dict(state, item)
    if chain.pipeline != pipeline.name or not 0 <= chain.index < len(pipeline.steps):
        raise BadItemError(
            "bad_pipeline_state",
            f"step {chain.index} of pipeline {chain.pipeline!r} "
            f"is not a step of {pipeline.name!r} as configured",
        )
    return chain


def start(
    pipeline: PipelineSpec, item: dict[str, Any], *, origin_seq: int | None, received_at: datetime
) -> ChainState:
    """The state of an item fed to ``pipeline``: its first step (which has no ``when``:
    nothing runs before it)."""
    return ChainState(pipeline.name, 0, item, origin_seq, iso(received_at))


# -- what follows a step ------------------------------------------------------------------


@dataclass(frozen=True)
class NextStep:
    state: ChainState
    msg_id: str

    @property
    def handler(self) -> str:
        return self.state.pipeline


@dataclass(frozen=True)
class Final:
    """The pipeline's final ending: ``outcome`` (handler = the pipeline) and what its
    event adds to a plain result event (``steps``, ``skipped``)."""

    outcome: Outcome
    extra: dict[str, Any] = field(default_factory=dict)


def step_msg_id(item_id: str, pipeline: str, index: int, origin_seq: int | None) -> str:
    return f"{item_id}:{pipeline}:step{index}:{origin_seq}"


def after_step(
    pipeline: PipelineSpec, state: ChainState, step_event: Mapping[str, Any], *, now: datetime
) -> NextStep | Final:
    """What follows the end of ``state``'s step, whose result event is ``step_event``:
    the next step that runs (``when`` skips steps), or the final ending (the last step
    done, or this one failed)."""
    handler = state.handler(pipeline)
    if step_event.get("status") != "ok":
        return _final(pipeline, state, now=now, failed=step_event, failed_step=handler)
    done = (*state.done, StepDone.from_event({**step_event, "handler": handler}))
    skipped = list(state.skipped)
    results = {d.handler: d.result for d in done}
    for index in range(state.index + 1, len(pipeline.steps)):
        step = pipeline.steps[index]
        if step.runs(results):
            nxt = ChainState(
                state.pipeline, index, state.item, state.origin_seq, state.received_at, done, tuple(skipped)
            )
            return NextStep(nxt, step_msg_id(str(state.item["id"]), pipeline.name, index, state.origin_seq))
        skipped.append(step.handler)
    ended = ChainState(
        state.pipeline,
        len(pipeline.steps),
        state.item,
        state.origin_seq,
        state.received_at,
        done,
        tuple(skipped),
    )
    return _final(pipeline, ended, now=now)


def _final(
    pipeline: PipelineSpec,
    state: ChainState,
    *,
    now: datetime,
    failed: Mapping[str, Any] | None = None,
    failed_step: str | None = None,
) -> Final:
    ran = [d.to_dict() for d in state.done]
    listing = [d.listing() for d in state.done]
    if failed is not None:
        listing.append(
            {**StepDone.from_event({**failed, "handler": failed_step}).listing(), "status": "error"}
        )
        ran.append(
            {
                "usage": failed.get("usage"),
                "cost_usd": failed.get("cost_usd"),
                "attempts": failed.get("attempts"),
            }
        )
    usage = Usage(0, 0)
    for d in ran:
        u = d.get("usage") or {}
        usage = usage + Usage(
            int(u.get("input_tokens", 0)), int(u.get("output_tokens", 0)), int(u.get("cached_tokens", 0))
        )
    costs = [d["cost_usd"] for d in ran if d.get("cost_usd") is not None]
    last = listing[-1] if listing else {}
    error: ErrorInfo | None = None
    if failed is not None:
        err = failed.get("error") or {}
        error = ErrorInfo(
            str(err.get("code", "internal")),
            f"step {failed_step!r}: {err.get('message', '')}",
            bool(err.get("retryable", False)),
            step=failed_step,
        )
    item = state.item
    outcome = Outcome(
        id=str(item["id"]),
        handler=pipeline.name,
        route=str(last.get("route") or "sync"),
        model=last.get("model"),
        received_at=datetime.fromisoformat(state.received_at.replace("Z", "+00:00")),
        completed_at=now,
        result={d.handler: d.result for d in state.done} if failed is None else None,
        error=error,
        batch_id=last.get("batch_id"),
        attempts=sum(int(d.get("attempts") or 0) for d in ran),
        cached=bool(state.done) and failed is None and all(d.cached for d in state.done),
        usage=usage,
        cost_usd=round(sum(costs), 10) if costs else None,
        metadata=item.get("metadata"),
        source=item.get("source"),
        handler_version=pipeline.version,
        last_message=None,
    )
    return Final(outcome, {"steps": listing, "skipped": list(state.skipped)})
