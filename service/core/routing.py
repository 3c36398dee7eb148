"""Routing (CONTRACT §5): a pure function from an item to its route."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from datetime import datetime, timedelta

from service.core.items import Item


@dataclass(frozen=True)
class SyncRoute:
    """Call the provider now."""

    reason: str


@dataclass(frozen=True)
class BatchRoute:
    """Buffer for the Batch API; ``key`` selects the buffer (provider, endpoint, model)."""

    key: BufferKey


@dataclass(frozen=True, order=True)
class BufferKey:
    provider: str
    endpoint: str
    model: str

    def subject_token(self) -> str:
        """The key as one NATS subject token (no dots, spaces or wildcards)."""
        return _subject_token(self.provider, self.endpoint, self.model)


@functools.cache
def _subject_token(provider: str, endpoint: str, model: str) -> str:  # a handful of keys, once each
    raw = f"{provider}|{endpoint}|{model}"
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in raw)


Route = SyncRoute | BatchRoute


@dataclass(frozen=True)
class RoutingRules:
    sync_priorities: frozenset[str]
    max_latency_s: float
    provider: str = "openai"


def route(item: Item, *, endpoint: str, model: str, rules: RoutingRules, now: datetime) -> Route:
    """Urgent work goes sync; the rest is batched unless its deadline is before the batch
    path could answer (now + ``max_latency_s``)."""
    if item.priority in rules.sync_priorities:
        return SyncRoute(reason=f"priority {item.priority}")
    if item.deadline is not None and item.deadline < now + timedelta(seconds=rules.max_latency_s):
        return SyncRoute(reason="deadline before batch latency")
    return BatchRoute(BufferKey(rules.provider, endpoint, model))
