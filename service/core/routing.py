"""Routing (CONTRACT §5, §11): pure functions from an item to its route.

Routes, cheapest last: ``sync`` (the standard tier, now), ``flex`` (OpenAI's flex
processing: batch prices, answered synchronously but slower, sometimes refused) and
``batch``. Flex is used only where it is allowed (``routing.flex`` and a model with a
flex price, or a handler that asks for it) and only when the deadline leaves room for a
whole flex call and a sync fallback (``flex_lead_s``)."""

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
class FlexRoute:
    """Call the provider now on the flex tier (``service_tier: "flex"``)."""

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


Route = SyncRoute | FlexRoute | BatchRoute

# Seconds of a deadline kept for the sync fallback after the last flex call could time out.
SYNC_RESERVE_S = 30.0


@dataclass(frozen=True)
class RoutingRules:
    sync_priorities: frozenset[str]
    max_latency_s: float
    provider: str = "openai"
    flex: bool = False  # routing.flex
    flex_timeout_s: float = 900.0  # the longest one flex call may take
    promote_margin_s: float = 900.0

    @property
    def flex_lead_s(self) -> float:
        """How far a deadline must be for a flex call: one whole flex call (it may take
        up to ``flex_timeout_s``) and still time for a sync call after it."""
        return self.flex_timeout_s + SYNC_RESERVE_S


def route(
    item: Item, *, endpoint: str, model: str, rules: RoutingRules, now: datetime, flex: bool = False
) -> Route:
    """Urgent work goes sync; the rest is batched unless its deadline is before the batch
    path could answer (now + ``max_latency_s``): then it goes flex when ``flex`` (allowed
    for this handler) and the deadline leaves room for it, else sync."""
    if item.priority in rules.sync_priorities:
        return SyncRoute(reason=f"priority {item.priority}")
    if item.deadline is not None and item.deadline < now + timedelta(seconds=rules.max_latency_s):
        return deadline_route(item.deadline, now=now, rules=rules, flex=flex)
    return BatchRoute(BufferKey(rules.provider, endpoint, model))


def deadline_route(
    deadline: datetime, *, now: datetime, rules: RoutingRules, flex: bool
) -> SyncRoute | FlexRoute:
    """The cheapest route now that can still meet ``deadline`` (also for promotion)."""
    if flex and (deadline - now).total_seconds() >= rules.flex_lead_s:
        return FlexRoute(reason="deadline before batch latency")
    return SyncRoute(
        reason="deadline before batch latency" if flex is False else "deadline too near for flex"
    )


def promote_due(deadline: datetime | None, *, now: datetime, rules: RoutingRules) -> bool:
    """An item waiting for a batch (buffered, or inside a provider batch) is answered on
    another route once its deadline comes within ``promote_margin_s``."""
    return deadline is not None and deadline - now <= timedelta(seconds=rules.promote_margin_s)


def flex_allowed(*, handler_flex: bool | None, routing_flex: bool, model_has_flex: bool, chat: bool) -> bool:
    """Whether a handler's calls may go flex: never for a model without a flex price or
    for embeddings; else as the handler says, or as ``routing.flex`` says."""
    if not model_has_flex or not chat:
        return False
    return routing_flex if handler_flex is None else handler_flex
