"""Rich tables for the operator commands."""

from __future__ import annotations

import time
from typing import Any

from rich.table import Table

from service.state.batches import BatchRecord


def money(value: float | None) -> str:
    """USD for people: cents-sized and larger to 4 places, small sums to 6."""
    if value is None:
        return "no price"
    if value == 0:
        return "$0"
    return f"${value:,.4f}" if abs(value) >= 0.01 else f"${value:.6f}"


def _age(ts: float) -> str:
    seconds = max(0, int(time.time() - ts))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m"
    return f"{seconds // 3600}h"


def batches_table(records: list[BatchRecord]) -> Table:
    table = Table(title="batches")
    for column in ("batch", "model", "state", "provider status", "items", "done", "failed", "age", "note"):
        table.add_column(column, no_wrap=column in ("batch", "id", "model", "handler"))
    for r in records:
        counts = r.request_counts or {}
        table.add_row(
            r.batch_id or f"({r.flush_id})",
            r.model,
            r.state,
            r.provider_status or "-",
            str(r.count),
            str(counts.get("completed", "-")),
            str(counts.get("failed", "-")),
            _age(r.created_at),
            r.note or "",
        )
    return table


def dlq_table(entries: list[dict[str, Any]]) -> Table:
    table = Table(title="dead letters")
    for column in ("seq", "handler", "id", "code", "attempts", "failed at", "message"):
        table.add_column(column, no_wrap=column in ("batch", "id", "model", "handler"))
    for e in entries:
        item = e.get("item") or {}
        error = e.get("error") or {}
        table.add_row(
            str(e.get("_seq")),
            e.get("handler", ""),
            str(item.get("id", "(unparsed)")),
            error.get("code", ""),
            str(e.get("attempts", "")),
            e.get("failed_at", ""),
            str(error.get("message", ""))[:80],
        )
    return table
