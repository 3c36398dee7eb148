"""Pydantic models of every payload on enrichd's subjects (CONTRACT §1-§3, §7). Pure.

These models *describe* the wire format for the AsyncAPI document (``service.asyncapi``)
and for consumers; the daemon itself builds its payloads in ``service.core.events``,
``service.batcher``, ``service.app`` and ``service.sources.folders``.
``tests/unit/test_asyncapi.py`` checks that what those build is valid against the schemas
generated from here.

Events allow extra keys (consumers must tolerate new ones); the item does not (CONTRACT §2:
"anything else is a bad item").
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

ITEM_ID_PATTERN = r"^[A-Za-z0-9._:-]{1,128}$"

Priority = Literal["urgent", "high", "normal", "low"]


class Item(BaseModel):
    """An item to enrich. A key not listed here makes it a bad item (an error result
    event and a DLQ entry)."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "id": "msg-2026-11-22-0042",
                    "text": "the content to enrich",
                    "fields": {"subject": "Invoice overdue", "from": "ap@example.com"},
                    "priority": "normal",
                    "deadline": "2026-11-23T09:00:00Z",
                    "metadata": {"mailbox": "ops"},
                    "source": "email",
                }
            ]
        },
    )

    id: str | None = Field(
        default=None,
        pattern=ITEM_ID_PATTERN,
        description=(
            "1-128 chars of A-Za-z0-9._:-. Default: the hex SHA-256 of the handler name and the "
            "canonical JSON of text + fields, so identical content gets the same id."
        ),
    )
    text: str = Field(pattern=r"\S", description="The content to enrich; must not be empty or blank.")
    fields: dict[str, str] | None = Field(
        default=None, description="Strings that fill the handler's prompt template alongside {text}."
    )
    priority: Priority = Field(
        default="normal", description="urgent and high go sync by default; normal and low go batch."
    )
    deadline: AwareDatetime | None = Field(
        default=None, description="RFC 3339 with a time zone: the latest time the result is useful."
    )
    metadata: dict[str, Any] | None = Field(default=None, description="Echoed back untouched.")
    source: str | None = Field(default=None, description="Echoed back untouched.")


class ErrorInfo(BaseModel):
    """Why an item failed. Codes are listed in docs/errors.md."""

    code: str = Field(description="Stable error code, e.g. invalid_json, rate_limited, batch_expired.")
    message: str
    retryable: bool = Field(description="Whether sending the item again may succeed.")
    step: str | None = Field(
        default=None, description="A pipeline's event only: the step (handler) that failed (CONTRACT §14)."
    )


class Usage(BaseModel):
    """Tokens billed by the provider for one item."""

    input_tokens: int = Field(ge=0)
    output_tokens: int = Field(ge=0)
    cached_tokens: int = Field(
        default=0,
        ge=0,
        description=(
            "Of input_tokens, those the provider read from its prompt cache (priced at the "
            "model's cached-input rate); present only when not 0."
        ),
    )


class DigestInfo(BaseModel):
    """The window and group a digest event covers (CONTRACT §15)."""

    window_start: datetime = Field(description="Members' results were published at or after this time...")
    window_end: datetime = Field(description="...and before this one (JetStream message time).")
    group: str | None = Field(
        description="The group_by value; null without group_by (or for members without it)."
    )
    members: int = Field(ge=1, description="How many results (distinct item ids) the digest covers.")
    member_ids: list[str] = Field(description="Their item ids, in publication order.")
    member_ids_truncated: bool | None = Field(
        default=None,
        description="True when member_ids was cut to fit NATS's max_payload (members stays exact).",
    )


class ResultEvent(BaseModel):
    """One result per accepted item; also the reply to a sync request.

    On `status: ok` `result` is set and `error` is null; on `status: error`
    `result` is null and `error` says why. Every key is always present.
    """

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "id": "msg-2026-11-22-0042",
                    "handler": "summarize",
                    "status": "ok",
                    "result": {"summary": "..."},
                    "error": None,
                    "route": "batch",
                    "model": "gpt-4o-mini",
                    "handler_version": "3f2a9c1b7d04",
                    "batch_id": "batch_abc123",
                    "attempts": 1,
                    "cached": False,
                    "packed": 1,
                    "usage": {"input_tokens": 412, "output_tokens": 57},
                    "cost_usd": 0.0000481,
                    "metadata": {"mailbox": "ops"},
                    "source": "email",
                    "received_at": "2026-11-22T10:00:00Z",
                    "completed_at": "2026-11-22T10:41:07Z",
                }
            ]
        }
    )

    id: str = Field(description="The item's id (given or derived).")
    handler: str
    status: Literal["ok", "error"]
    result: str | dict[str, Any] | None = Field(
        description=(
            "A string for text handlers, an object valid against the handler's schema for "
            "structured ones ({embedding, dimensions} for embed); null on error."
        )
    )
    error: ErrorInfo | None = Field(description="Null when status is ok.")
    route: str = Field(
        description=(
            "sync, flex (OpenAI's flex tier, batch prices) or batch; consumers must tolerate new values."
        ),
        examples=["sync", "flex", "batch"],
    )
    model: str | None
    handler_version: str | None = Field(
        description=(
            "First 12 hex digits of the SHA-256 of the handler's definition (model, system, "
            "prompt, output schema, generation parameters, pack): a cached answer is only "
            "given for the same id and version. Null when the handler is unknown."
        )
    )
    batch_id: str | None = Field(description="The provider batch, on the batch route.")
    attempts: int = Field(ge=0, description="Provider attempts made for this item.")
    cached: bool = Field(description="True when answered from the result store without a provider call.")
    packed: int = Field(
        ge=1, description="How many items shared the provider request (CONTRACT §12); 1 when not packed."
    )
    usage: Usage | None
    cost_usd: float | None = Field(ge=0)
    metadata: dict[str, Any] | None = Field(description="The item's metadata, echoed.")
    source: str | None = Field(description="The item's source, echoed.")
    received_at: datetime
    completed_at: datetime
    steps: list[PipelineStep] | None = Field(
        default=None,
        description=(
            "A pipeline's event only (CONTRACT §14): each step that ran, in order; on error the "
            "last one is the failed step (status error). result holds one entry per step that answered."
        ),
    )
    skipped: list[str] | None = Field(
        default=None, description="A pipeline's event only: the steps whose `when` was false."
    )
    digest: DigestInfo | None = Field(
        default=None,
        description=(
            "Only on a digest's event (enrich.out.<digest>, CONTRACT §15): the window and group "
            "whose members it digests; `handler` is then the digest's name."
        ),
    )


class PipelineStep(BaseModel):
    """One step of a pipeline's result event."""

    handler: str
    route: str | None
    model: str | None
    handler_version: str | None
    batch_id: str | None
    cached: bool
    attempts: int = Field(ge=0)
    usage: Usage | None
    cost_usd: float | None
    status: Literal["ok", "error"] = "ok"


ResultEvent.model_rebuild()


class DlqEntry(BaseModel):
    """An item that failed for good, with enough to replay it (`enrichd dlq replay`)."""

    id: str = Field(
        description="The id of the item's error result event (salvaged or made up for an unparsable item)."
    )
    handler: str
    item: dict[str, Any] | None = Field(
        description="The original item as sent; null when it could not be parsed (see raw)."
    )
    raw: str | None = Field(default=None, description="The message body as text, only when item is null.")
    error: ErrorInfo = Field(description="The final error.")
    attempts: int = Field(ge=0)
    subject: str = Field(description="The intake subject the item came from.")
    failed_at: datetime
    last_provider_message: str | None = Field(
        description="The provider's last message about this item, when there was one."
    )
    file: str | None = Field(
        default=None, description="The watched-folder file the item came from, for folder items."
    )


class BatchEvent(BaseModel):
    """A provider batch changed state (`batch.submitted`)."""

    batch_id: str | None = Field(description="The provider's batch id.")
    flush_id: str = Field(description="The daemon's id for one buffer flush (stable across resubmits).")
    model: str
    endpoint: str = Field(examples=["/v1/chat/completions", "/v1/embeddings"])
    items: int = Field(ge=0)
    tokens: int = Field(ge=0, description="Estimated input tokens of the batch.")
    request_counts: dict[str, int] = Field(description="The provider's counts (total, completed, failed).")
    status: str | None = Field(description="The provider's batch status.")
    at: datetime


class BatchFinishedEvent(BatchEvent):
    """A batch ended and its items' results are published (`batch.completed`,
    `batch.expired`, `batch.cancelled`)."""

    ok: int = Field(ge=0, description="Items that got an ok result.")
    error: int = Field(ge=0, description="Items that failed for good (result event + DLQ).")
    retried: int = Field(ge=0, description="Items sent back to the buffer for another batch.")


class BatchFailedEvent(BatchEvent):
    """The provider failed a batch (`batch.failed`): either its items are published
    (counts set) or the whole flush is resubmitted later (`reason` set)."""

    ok: int | None = Field(default=None, ge=0)
    error: int | None = Field(default=None, ge=0)
    retried: int | None = Field(default=None, ge=0)
    reason: str | None = Field(
        default=None, description="Why the flush will be resubmitted, e.g. token_limit_exceeded."
    )


class BudgetExceededEvent(BaseModel):
    """A daily budget is spent; new work waits for the next budget day (once per day and scope)."""

    day: str = Field(pattern=r"^\d{8}$", description="The UTC budget day, YYYYMMDD.")
    scope: str = Field(description="all, or h-<handler> for a per-handler cap.", examples=["all", "h-tags"])
    cap_usd: float
    spent_usd: float
    at: datetime


class AlertEvent(BaseModel):
    """Something an operator should look at, at most once per `alerts.cooldown_s` for each
    kind and key. `kind` says what; the other keys are the figures behind it:
    `failure_rate` (rate, errors, results, window_s), `retry_budget` (retries, calls, ratio,
    budget, window_s), `batch_sla` (batch_id, age_s, sla_s), `budget_exceeded` (those of
    the budget.exceeded event)."""

    model_config = ConfigDict(extra="allow")

    kind: str = Field(examples=["failure_rate", "retry_budget", "batch_sla", "budget_exceeded"])
    key: str = Field(description="What the alert is about: `all`, a batch id, or a budget scope.")
    message: str = Field(description="One line for a human.")
    instance: str = Field(description="The replica that raised it.")
    at: datetime


class FileDoneEvent(BaseModel):
    """Every item of a watched-folder file has its result and the results file is written."""

    file: str = Field(description="The file's name.")
    path: str = Field(description="Its path under the inbox.")
    handler: str
    items: int = Field(ge=0)
    ok: int = Field(ge=0)
    error: int = Field(ge=0)
    cached: int = Field(ge=0)
    results: str = Field(description="The results file (<outbox>/<handler>/<name>.results.jsonl).")
    moved_to: str | None = Field(description="Where the source file was moved (inbox/.done/...).")
    at: datetime


class DigestClosedEvent(BaseModel):
    """A digest window with members closed: one event per group was published."""

    digest: str
    window_start: datetime
    window_end: datetime
    groups: int = Field(ge=1)
    members: int = Field(ge=1)
    errors: int = Field(ge=0, description="Groups whose digest ended in an error event.")
    instance: str = Field(description="The replica that ran the window.")


class DigestFailedEvent(BaseModel):
    """A digest of one window and group failed for good: an error event and a DLQ entry were published."""

    digest: str
    window_start: datetime
    window_end: datetime
    group: str | None
    members: int = Field(ge=1)
    error: ErrorInfo
    instance: str


class DigestSkippedEvent(BaseModel):
    """More windows closed while no daemon ran than `digests.max_backlog`: the older ones were skipped."""

    digest: str
    from_: datetime = Field(alias="from", description="The first window start skipped.")
    to: datetime = Field(description="The first window run again.")
    max_backlog: int = Field(ge=1)
    instance: str


# Lifecycle topics on `<prefix>.events.<topic>` (CONTRACT §1) and their payloads.
LIFECYCLE_EVENTS: dict[str, type[BaseModel]] = {
    "batch.submitted": BatchEvent,
    "batch.completed": BatchFinishedEvent,
    "batch.failed": BatchFailedEvent,
    "batch.expired": BatchFinishedEvent,
    "batch.cancelled": BatchFinishedEvent,
    "budget.exceeded": BudgetExceededEvent,
    "alert": AlertEvent,
    "file.done": FileDoneEvent,
    "digest.closed": DigestClosedEvent,
    "digest.failed": DigestFailedEvent,
    "digest.skipped": DigestSkippedEvent,
}
