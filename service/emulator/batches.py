"""Batch objects: create-request validation, the status machine and the store.

Only the eight official statuses are ever used. Every status change goes through
:func:`transition`, which stamps the matching ``*_at`` field and logs one line.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

from . import errors, ids
from .batch_input import ALLOWED_ENDPOINTS
from .errors import EmulatedError
from .files import MAX_EXPIRY_S, MIN_EXPIRY_S

logger = logging.getLogger("enrichd.emulator")

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
COMPLETION_WINDOW_S = 86_400
MAX_METADATA_PAIRS = 16
MAX_METADATA_KEY = 64
MAX_METADATA_VALUE = 512
_TIMESTAMP_OF = {
    "in_progress": "in_progress_at",
    "finalizing": "finalizing_at",
    "completed": "completed_at",
    "failed": "failed_at",
    "expired": "expired_at",
    "cancelling": "cancelling_at",
    "cancelled": "cancelled_at",
}


@dataclass(frozen=True)
class CreateParams:
    """A validated ``POST /v1/batches`` body."""

    input_file_id: str
    endpoint: str
    metadata: dict[str, str] | None
    output_expires_after_s: int | None


def _check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict):
        raise errors.invalid_type("metadata", "an object", metadata)
    if len(metadata) > MAX_METADATA_PAIRS:
        raise EmulatedError(
            400,
            f"Invalid 'metadata': too many properties. Expected an object with at most {MAX_METADATA_PAIRS} "
            f"properties, but got an object with {len(metadata)} properties instead.",
            param="metadata",
            code="object_above_max_properties",
        )
    for key, value in metadata.items():
        if not isinstance(value, str):
            raise errors.invalid_type(f"metadata.{key}", "a string", value)
        for what, text, limit in (("key", key, MAX_METADATA_KEY), ("value", value, MAX_METADATA_VALUE)):
            if len(text) > limit:
                raise EmulatedError(
                    400,
                    f"Invalid 'metadata': {what} too long. Expected a string with maximum length {limit}, "
                    f"but got a string with length {len(text)} instead.",
                    param="metadata",
                    code="string_above_max_length",
                )
    return dict(metadata)


def _check_output_expiry(value: Any) -> int | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        raise errors.invalid_type("output_expires_after", "an object", value)
    if value.get("anchor") != "created_at":
        raise errors.invalid_value("output_expires_after.anchor", value.get("anchor"), ("created_at",))
    seconds = value.get("seconds")
    if isinstance(seconds, bool) or not isinstance(seconds, int):
        raise errors.invalid_type("output_expires_after.seconds", "an integer", seconds)
    if not MIN_EXPIRY_S <= seconds <= MAX_EXPIRY_S:
        bound = {"minimum": MIN_EXPIRY_S} if seconds < MIN_EXPIRY_S else {"maximum": MAX_EXPIRY_S}
        raise errors.integer_out_of_range("output_expires_after.seconds", seconds, **bound)
    return seconds


def parse_create_request(body: Any) -> CreateParams:
    """Validate a create body like the real endpoint; raises :class:`EmulatedError` (400)."""
    if not isinstance(body, dict):
        raise EmulatedError(400, "Invalid body: the request body must be a JSON object.")
    for name in ("input_file_id", "endpoint", "completion_window"):
        if name not in body:
            raise errors.missing_param(name)
    if not isinstance(body["input_file_id"], str):
        raise errors.invalid_type("input_file_id", "a string", body["input_file_id"])
    if body["endpoint"] not in ALLOWED_ENDPOINTS:
        raise errors.invalid_value("endpoint", body["endpoint"], ALLOWED_ENDPOINTS)
    if body["completion_window"] != "24h":
        raise errors.invalid_value("completion_window", body["completion_window"], ("24h",))
    return CreateParams(
        input_file_id=body["input_file_id"],
        endpoint=body["endpoint"],
        metadata=_check_metadata(body.get("metadata")),
        output_expires_after_s=_check_output_expiry(body.get("output_expires_after")),
    )


@dataclass
class BatchRecord:
    """One batch; mutated only by the runner and :func:`transition`."""

    id: str
    seq: int
    input_file_id: str
    endpoint: str
    created_at: int
    metadata: dict[str, str] | None = None
    output_expires_after_s: int | None = None
    status: str = "validating"
    timestamps: dict[str, int | None] = field(default_factory=lambda: dict.fromkeys(_TIMESTAMP_OF.values()))
    output_file_id: str | None = None
    error_file_id: str | None = None
    errors: list[dict[str, Any]] | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    model: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    enqueued_tokens: int = 0
    cancel_requested: bool = False

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def to_dict(self, *, empty_string_file_ids: bool = False) -> dict[str, Any]:
        """The ``Batch`` JSON."""
        missing = "" if empty_string_file_ids else None
        usage = None
        if self.timestamps["in_progress_at"] is not None:
            usage = {
                "input_tokens": self.input_tokens,
                "input_tokens_details": {"cached_tokens": 0},
                "output_tokens": self.output_tokens,
                "output_tokens_details": {"reasoning_tokens": 0},
                "total_tokens": self.input_tokens + self.output_tokens,
            }
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "model": self.model,
            "errors": {"object": "list", "data": self.errors} if self.errors else None,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id or missing,
            "error_file_id": self.error_file_id or missing,
            "created_at": self.created_at,
            "expires_at": self.created_at + COMPLETION_WINDOW_S,
            **self.timestamps,
            "request_counts": {"total": self.total, "completed": self.completed, "failed": self.failed},
            "usage": usage,
            "metadata": self.metadata,
        }


def transition(batch: BatchRecord, status: str, now: int) -> None:
    """Move ``batch`` to ``status``, stamping ``<status>_at`` and logging the change."""
    previous = batch.status
    batch.status = status
    stamp = _TIMESTAMP_OF.get(status)
    if stamp is not None:
        batch.timestamps[stamp] = now
    logger.info(
        "batch %s %s -> %s (completed=%d failed=%d total=%d)",
        batch.id, previous, status, batch.completed, batch.failed, batch.total,
    )  # fmt: skip


def request_cancel(batch: BatchRecord, now: int) -> None:
    """Apply a cancel request: ``cancelling`` now, ``cancelled`` once the runner stops."""
    if batch.terminal:
        raise EmulatedError(
            400, f"Cannot cancel batch {batch.id}: it is already {batch.status}.", param="batch_id"
        )
    if batch.status == "cancelling":
        return
    batch.cancel_requested = True
    transition(batch, "cancelling", now)


def batch_not_found(batch_id: str) -> EmulatedError:
    return EmulatedError(404, f"No batch found with id '{batch_id}'.")


class BatchStore:
    """Batches by ID in creation order; listing is newest first."""

    def __init__(self) -> None:
        self._batches: dict[str, BatchRecord] = {}

    def create(self, params: CreateParams, *, now: int) -> BatchRecord:
        batch = BatchRecord(
            id=ids.batch_id(),
            seq=len(self._batches),
            input_file_id=params.input_file_id,
            endpoint=params.endpoint,
            created_at=now,
            metadata=params.metadata,
            output_expires_after_s=params.output_expires_after_s,
        )
        self._batches[batch.id] = batch
        return batch

    def get(self, batch_id: str) -> BatchRecord:
        batch = self._batches.get(batch_id)
        if batch is None:
            raise batch_not_found(batch_id)
        return batch

    def forget(self, batch_id: str) -> None:
        """Drop a batch as if the provider had lost it (fault ``forget``)."""
        self._batches.pop(batch_id, None)

    def page(self, *, after: str | None, limit: int) -> tuple[list[BatchRecord], bool]:
        records = list(reversed(self._batches.values()))
        if after is not None:
            positions = [i for i, b in enumerate(records) if b.id == after]
            records = records[positions[0] + 1 :] if positions else []
        return records[:limit], len(records) > limit

    def enqueued_tokens(self, model: str) -> int:
        """Prompt tokens of this model's batches that are validated but not yet terminal."""
        return sum(b.enqueued_tokens for b in self._batches.values() if b.model == model and not b.terminal)
