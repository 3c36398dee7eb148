"""Counters exposed as ``Emulator.stats`` and ``GET /_emulator/stats``."""

from __future__ import annotations

from collections import Counter
from typing import Any


class Stats:
    """What the emulator has seen; tests assert on it (e.g. no custom_id sent twice)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: Counter[str] = Counter()
        self.status_counts: Counter[int] = Counter()
        self.faults_injected: Counter[str] = Counter()
        self.chat_requests_ok = 0
        self.embeddings_ok = 0
        self.batches_created = 0
        self.batch_lines_total = 0
        self.custom_ids_submitted: Counter[str] = Counter()
        self.custom_ids_succeeded: Counter[str] = Counter()
        self.tokens_in = 0
        self.tokens_out = 0
        self.batch_ids: list[str] = []

    def snapshot(self) -> dict[str, Any]:
        """A copy made of plain dicts and lists (``status_counts`` keys are ints)."""
        return {
            "requests": dict(self.requests),
            "status_counts": dict(self.status_counts),
            "faults_injected": dict(self.faults_injected),
            "chat_requests_ok": self.chat_requests_ok,
            "embeddings_ok": self.embeddings_ok,
            "batches_created": self.batches_created,
            "batch_lines_total": self.batch_lines_total,
            "custom_ids_submitted": dict(self.custom_ids_submitted),
            "custom_ids_succeeded": dict(self.custom_ids_succeeded),
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "batch_ids": list(self.batch_ids),
        }
