"""The ending of an item, for every route: the result event, the DLQ entry, their
``Nats-Msg-Id``s, the intake-seq header and the log line. Pure: the caller writes what
this returns (the exactly-once story lives in these ids, so it is written once).

Message ids (CONTRACT §1):
- ``ok`` event ``<id>:<handler>``; ``error`` event ``<id>:<handler>:error:<intake seq>``;
- a stored answer for another intake message ``<id>:<handler>:cached:<intake seq>``;
- DLQ entry ``<id>:<handler>:dlq:<intake seq>``, or ``:dlq:sync-<request id>`` for a
  sync request (no intake seq: every failed request gets its own entry).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from service.core.errors import ErrorInfo
from service.core.events import Outcome, dlq_entry, fitted_entry, result_event, result_msg_id, stored_answer
from service.core.items import Item, salvage

INTAKE_SEQ_HEADER = "Enrichd-Intake-Seq"

__all__ = [
    "INTAKE_SEQ_HEADER",
    "Ending",
    "dlq_msg_id",
    "end",
    "from_store",
    "result_event",
    "salvaged_outcome",
]


@dataclass(frozen=True)
class Ending:
    """Everything one item's ending writes. ``dlq_payload`` (already fitted to the size
    limit) and ``dlq_msg_id`` are set for ``error`` endings only; ``header_seq`` is the
    value of the intake-seq header of the result event, None for no header."""

    event: dict[str, Any]
    msg_id: str
    header_seq: int | None
    dlq_payload: bytes | None = None
    dlq_msg_id: str | None = None
    cached: bool = False
    log_level: int = logging.DEBUG
    log_message: str = "item done"
    log_fields: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, str]:
        """The result event's headers (tracing headers are the publisher's to add)."""
        headers = {"Nats-Msg-Id": self.msg_id}
        if self.header_seq is not None:
            headers[INTAKE_SEQ_HEADER] = str(self.header_seq)
        return headers


def dlq_msg_id(item_id: str, handler: str, intake_seq: int | None, *, request_id: str | None = None) -> str:
    """Redeliveries of one intake message share a DLQ id (deduplicated); a sync request
    (no intake seq) names its own ``request_id``."""
    if intake_seq is not None:
        return f"{item_id}:{handler}:dlq:{intake_seq}"
    if request_id is None:
        raise ValueError("a DLQ entry without an intake seq needs a request_id")
    return f"{item_id}:{handler}:dlq:sync-{request_id}"


def end(
    outcome: Outcome,
    *,
    intake_seq: int | None,
    subject: str,
    item: Item | dict[str, Any] | None,
    raw: bytes | None,
    encode: Callable[[Any], bytes],
    max_dlq_bytes: int,
    request_id: str | None = None,
    header_on_error: bool = True,
    extra: dict[str, Any] | None = None,
) -> Ending:
    """The ending of ``outcome``. ``item`` (parsed) or else ``raw`` (the intake body)
    goes into the DLQ entry, encoded with ``encode`` and cut to ``max_dlq_bytes``
    (:func:`service.core.events.fitted_entry`). ``header_on_error=False`` leaves the
    intake-seq header off ``error`` events (the batch route today: its error events are
    matched by their ``:error:<seq>`` id). ``extra``: keys the event adds (a pipeline's
    ``steps``, service/core/chain.py)."""
    event = result_event(outcome)
    if extra:
        event.update(extra)
    error_seq = None if outcome.ok else intake_seq
    msg_id = result_msg_id(outcome.id, outcome.handler, error_intake_seq=error_seq)
    header_seq = intake_seq if outcome.ok or header_on_error else None
    fields = log_fields(outcome)
    if outcome.ok:
        return Ending(event, msg_id, header_seq, log_fields=fields)
    assert outcome.error is not None
    item_dict = item.to_dict() if isinstance(item, Item) else item
    entry = dlq_entry(
        id=outcome.id,
        handler=outcome.handler,
        item=item_dict,
        raw=raw if item_dict is None else None,
        error=outcome.error,
        attempts=outcome.attempts,
        subject=subject,
        failed_at=outcome.completed_at,
        last_provider_message=outcome.last_message,
    )
    return Ending(
        event,
        msg_id,
        header_seq,
        dlq_payload=fitted_entry(entry, encode, max_dlq_bytes),
        dlq_msg_id=dlq_msg_id(outcome.id, outcome.handler, intake_seq, request_id=request_id),
        log_level=logging.WARNING,
        log_message="item failed",
        log_fields=fields,
    )


def log_fields(outcome: Outcome) -> dict[str, Any]:
    """The fields of the ending's log line (a warning for errors, debug for ``ok``)."""
    usage = outcome.usage
    tokens = {
        "input_tokens": usage.input_tokens if usage else None,
        "output_tokens": usage.output_tokens if usage else None,
    }
    base = {"item_id": outcome.id, "handler": outcome.handler}
    if outcome.route == "batch":
        error_code = outcome.error.code if outcome.error else None
        return {
            **base,
            "batch_id": outcome.batch_id,
            "attempts": outcome.attempts,
            "error_code": error_code,
            **tokens,
        }
    if outcome.error is not None:
        return {**base, "error_code": outcome.error.code, "attempts": outcome.attempts}
    return {
        **base,
        "route": outcome.route,
        "attempts": outcome.attempts,
        **tokens,
        "cost_usd": outcome.cost_usd,
    }


def from_store(
    stored_event: dict[str, Any],
    stored_intake_seq: int | None,
    *,
    intake_seq: int | None,
    metadata: Any,
    source: Any,
    received_at: datetime,
    now: datetime,
) -> Ending:
    """An intake message answered from the result store: the original event again for a
    redelivery of the message that produced it, else a ``cached`` copy under its own id
    (see :func:`service.core.events.stored_answer`). The header names the message this
    answers."""
    event, msg_id, cached = stored_answer(
        stored_event,
        stored_intake_seq,
        intake_seq=intake_seq,
        metadata=metadata,
        source=source,
        received_at=received_at,
        now=now,
    )
    return Ending(event, msg_id, intake_seq, cached=cached)


def salvaged_outcome(
    raw: bytes,
    handler: str,
    error: ErrorInfo,
    *,
    received_at: datetime,
    now: datetime,
    attempts: int = 0,
    model: str | None = None,
    item: Item | None = None,
) -> Outcome:
    """The ``error`` outcome of an intake message that has no parsed item to speak for it
    (bad input, an internal failure, max deliveries): id, metadata and source come from
    ``item`` when it could be parsed, else are salvaged from ``raw``."""
    if item is not None:
        item_id, metadata, source = item.id, item.metadata, item.source
    else:
        item_id, metadata, source = salvage(raw)
    return Outcome(
        id=item_id,
        handler=handler,
        route="sync",
        model=model,
        received_at=received_at,
        completed_at=now,
        error=error,
        attempts=attempts,
        metadata=metadata,
        source=source,
    )
