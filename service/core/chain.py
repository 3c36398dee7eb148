"""Pipelines (CONTRACT §14), pure: the state an item carries from step to step, and what
follows a finished step (the next step's message, or the pipeline's final ending). The
definitions and their start-up checks are service/core/pipelines.py.

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

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from service.core.cost import Usage
from service.core.errors import BadItemError, ErrorInfo
from service.core.events import Outcome, iso
from service.core.pipelines import (
    Condition,
    PipelineConfigError,
    PipelineSpec,
    Step,
    build_pipelines,
    parse_condition,
    referenced_handlers,
)

__all__ = [
    "ENVELOPE",
    "ChainState",
    "Condition",
    "Final",
    "NextStep",
    "PipelineConfigError",
    "PipelineSpec",
    "Step",
    "StepDone",
    "after_step",
    "build_pipelines",
    "parse_condition",
    "read_envelope",
    "referenced_handlers",
    "start",
]

# The key of a step message's envelope (beside "item"); an item fed from outside never
# has it (an item with any other top-level key is refused).
ENVELOPE = "enrichd_pipeline"


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


def too_large(pipeline: PipelineSpec, state: ChainState, size: int, limit: int, *, now: datetime) -> Final:
    """The message of ``state``'s step (it carries the earlier results) would not fit a
    NATS message: the item ends here, its error naming that step."""
    message = (
        f"the step's message is {size} bytes with the earlier steps' results; NATS takes at most "
        f"{limit} (the server's max_payload less headers)"
    )
    failed = {
        "status": "error",
        "error": {"code": "item_too_large", "message": message, "retryable": False},
        "attempts": 0,
    }
    return _final(pipeline, state, now=now, failed=failed, failed_step=state.handler(pipeline))


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
