"""Small helpers on a batch record shared by the batch path's parts."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from service.core.cost import Usage
from service.core.events import iso
from service.core.routing import BufferKey
from service.state.batches import BatchRecord


def clear_fault(record: BatchRecord) -> None:
    """The permanent fault the record was backing off from is over."""
    record.fault_step = record.fault_code = None
    record.fault_since, record.fault_count = 0.0, 0


def event_body(record: BatchRecord, now_s: float) -> dict[str, Any]:
    """The body of a ``batch.*`` lifecycle event about the record, stamped ``now_s``."""
    return record.event_body(iso(datetime.fromtimestamp(now_s, UTC)))


def record_token(record: BatchRecord) -> str:
    """The buffer subject token of the record's (provider, endpoint, model)."""
    return BufferKey(record.provider, record.endpoint, record.model).subject_token()


def carried_usage(item: dict[str, Any]) -> Usage:
    """What earlier batches spent on a buffered item: its share of a pack that did not
    answer it (``carried_usage``, set when it was sent back alone)."""
    carried = item.get("carried_usage")
    if not isinstance(carried, dict):
        return Usage(0, 0)
    return Usage(
        int(carried.get("input_tokens", 0)),
        int(carried.get("output_tokens", 0)),
        int(carried.get("cached_tokens", 0)),
    )
