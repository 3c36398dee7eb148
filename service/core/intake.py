"""What a source hands the pipeline, and what the pipeline hands back for the buffer
stream: plain data, no I/O. Sources and sinks depend on this module, never on the
pipeline itself. Also the pure steps between them: parsing an intake message once
(:func:`prepare`) and a batch-routed item's buffer message (:func:`buffer_write`)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from handlers import HandlerSpec
from service.core import chain as chain_core
from service.core import fastjson
from service.core.chain import ChainState, PipelineSpec
from service.core.errors import BadItemError
from service.core.events import iso
from service.core.items import Item, decode_object, item_from_object
from service.core.routing import BatchRoute


@dataclass(frozen=True)
class Intake:
    """One message as the source hands it over."""

    raw: bytes
    handler: str
    subject: str
    received_at: datetime
    seq: int | None = None  # intake stream sequence; None for sync requests


@dataclass(frozen=True)
class Prepared:
    """An intake message, parsed once: a good item (``error`` is None, ``item`` and
    ``body`` set) or a bad one (``error`` set; ``item`` kept when only the handler or the
    template failed, for the DLQ entry)."""

    intake: Intake
    item: Item | None
    body: dict[str, Any] | None
    error: BadItemError | None = None
    # A pipeline's item (CONTRACT §14): where it is in its pipeline. ``item`` is then the
    # item of the step it runs now (its handler is the step's).
    chain: ChainState | None = None

    @property
    def handler(self) -> str:
        """The handler that answers it: the step's for a pipeline item, else the intake's."""
        return self.item.handler if self.item is not None else self.intake.handler


@dataclass(frozen=True)
class BufferWrite:
    """A batch-routed item's buffer message, encoded and ready to publish."""

    handler: str
    subject_token: str
    payload: bytes
    msg_id: str
    deadline: datetime | None = None  # the item's: it may be promoted (CONTRACT §11)


class DeferError(Exception):
    """Not now: leave the message in NATS and try again after ``delay_s``."""

    def __init__(self, delay_s: float, reason: str) -> None:
        super().__init__(reason)
        self.delay_s = delay_s
        self.reason = reason


def prepare(
    intake: Intake,
    registry: Mapping[str, HandlerSpec],
    *,
    max_item_bytes: int,
    max_tokens_param: str,
    pipelines: Mapping[str, PipelineSpec] | None = None,
) -> Prepared:
    """Parse and validate, once. Errors in this order: size (and JSON), handler,
    content, template; the item is kept whenever it could be parsed."""
    try:
        data = decode_object(intake.raw, max_bytes=max_item_bytes)
    except BadItemError as exc:
        return Prepared(intake, None, None, exc)
    pipeline = pipelines.get(intake.handler) if pipelines else None
    if pipeline is not None:
        return prepare_step(intake, data, pipeline, registry, max_tokens_param=max_tokens_param)
    item: Item | None = None
    item_error: BadItemError | None = None
    try:
        item = item_from_object(data, intake.handler)
    except BadItemError as exc:
        item_error = exc
    spec = registry.get(intake.handler)
    if spec is None:
        return Prepared(
            intake, item, None, BadItemError("unknown_handler", f"no handler named {intake.handler!r}")
        )
    if item is None:
        return Prepared(intake, None, None, item_error)
    try:
        body = spec.build_body(item, max_tokens_param=max_tokens_param)
    except BadItemError as exc:
        return Prepared(intake, item, None, exc)
    return Prepared(intake, item, body)


def prepare_step(
    intake: Intake,
    data: dict[str, Any],
    pipeline: PipelineSpec,
    registry: Mapping[str, HandlerSpec],
    *,
    max_tokens_param: str,
) -> Prepared:
    """A message on a pipeline's intake subject: an item fed to the pipeline (its first
    step) or a step message (service/core/chain.py), parsed into the item of the step it
    runs now, with its request built from the earlier steps' results."""
    try:
        state = chain_core.read_envelope(data, pipeline)
        if state is None:
            item = item_from_object(data, pipeline.name)
            state = chain_core.start(
                pipeline, item.to_dict(), origin_seq=intake.seq, received_at=intake.received_at
            )
        else:
            item = item_from_object(state.item, pipeline.name)
    except BadItemError as exc:
        return Prepared(intake, None, None, exc)
    return _step(intake, item, state, pipeline, registry, max_tokens_param=max_tokens_param)


def prepare_next(
    intake: Intake,
    state: ChainState,
    pipeline: PipelineSpec,
    registry: Mapping[str, HandlerSpec],
    *,
    max_tokens_param: str,
) -> Prepared:
    """The next step of an item whose pipeline runs here at once (``enrich.sync``)."""
    item = item_from_object(state.item, pipeline.name)  # read once already: it is valid
    return _step(intake, item, state, pipeline, registry, max_tokens_param=max_tokens_param)


def _step(
    intake: Intake,
    item: Item,
    state: ChainState,
    pipeline: PipelineSpec,
    registry: Mapping[str, HandlerSpec],
    *,
    max_tokens_param: str,
) -> Prepared:
    step_item = dataclasses.replace(item, handler=state.handler(pipeline))
    try:
        body = registry[step_item.handler].build_body(
            step_item, max_tokens_param=max_tokens_param, steps=state.results
        )
    except BadItemError as exc:
        return Prepared(intake, step_item, None, exc, chain=state)
    return Prepared(intake, step_item, body, chain=state)


def too_large_to_buffer(size: int, max_message_bytes: int) -> BadItemError:
    return BadItemError(
        "item_too_large",
        f"item needs a {size}-byte buffer message; NATS takes at most {max_message_bytes} "
        f"(the server's max_payload less headers): send it on enrich.sync, or raise max_payload",
    )


def buffer_write(
    intake: Intake,
    item: Item,
    decision: BatchRoute,
    *,
    traceparent: str | None = None,
    chain: ChainState | None = None,
) -> BufferWrite:
    """The buffer message of a batch-routed item; its Nats-Msg-Id makes a redelivered
    intake message's second write a duplicate JetStream drops."""
    record = buffer_record(intake, item, decision, chain=chain)
    if traceparent:
        record["traceparent"] = traceparent
    return BufferWrite(
        item.handler,
        decision.key.subject_token(),
        fastjson.dumps(record),
        f"{item.handler}:{item.id}:{intake.seq}",
        item.deadline,
    )


def buffer_record(
    intake: Intake, item: Item, decision: BatchRoute, *, chain: ChainState | None = None
) -> dict[str, Any]:
    """What a batched item's buffer message holds: enough to send it in a batch and to
    answer it later without the intake message. The request body is not kept (it holds
    the text a second time): the flush builds it from the item (core/flush_plan.py,
    request_body), and a pipeline step's from its ``chain`` too."""
    record = {
        "handler": item.handler,
        "item": item.to_dict(),
        "endpoint": decision.key.endpoint,
        "model": decision.key.model,
        "received_at": iso(intake.received_at),
        "intake_seq": intake.seq,
    }
    if chain is not None:
        record["chain"] = chain.to_dict()
    return record
