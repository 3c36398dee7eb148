"""Estimates that hold (issue 12): the arithmetic behind ``enrichd estimate`` and the
estimate-against-billed figures of ``enrichd status``. Pure.

An estimate of a set of items is

- input tokens: tiktoken's count of each item's request body (``core.tokens``), less the
  shared system prompt of all but one item per pack when the handler packs (``pack``);
- output tokens: per item, the handler's **observed** average output tokens of its ``ok``
  results (kept in the daily stats, :func:`output_guess`): of the current handler
  version when it has :data:`MIN_OBSERVED` results, else of the handler across versions,
  else ``max_output_tokens`` (an upper bound); never more than ``max_output_tokens``;
- a route per item (:func:`expected_route`, the daemon's own ``core.routing.route``):
  ``routing.sync_priorities`` go sync; a deadline before the batch path could answer (now +
  ``batching.max_latency_s``) goes flex where the handler may go flex and the deadline
  leaves room for a flex call and a sync fallback, else sync; the rest batch;
- cost per route from the price table (``core.cost``: flex and batch at the batch discount).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from service.core import routing
from service.core.cost import Price, Usage, cost_usd
from service.core.items import Item
from service.core.routing import BatchRoute, FlexRoute, RoutingRules

ROUTES = ("sync", "flex", "batch")
# Fewer ok results than this say too little about a handler's answers to replace the bound.
MIN_OBSERVED = 5


@dataclass(frozen=True)
class Observed:
    """Sums over ``ok`` results that were paid for (not ``cached``)."""

    items: int = 0
    input_tokens: int = 0
    output_tokens: int = 0

    def __add__(self, other: Observed) -> Observed:
        return Observed(
            self.items + other.items,
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
        )

    @property
    def output_per_item(self) -> float:
        return self.output_tokens / self.items if self.items else 0.0

    @property
    def input_per_item(self) -> float:
        return self.input_tokens / self.items if self.items else 0.0


def observed_from_tallies(handlers: Mapping[str, Any]) -> dict[tuple[str, str], Observed]:
    """The stats' ``handlers`` section (``{handler: {version: {route: {...}}}}``, see
    ``state.stats``) as one :class:`Observed` per (handler, version), routes summed."""
    out: dict[tuple[str, str], Observed] = {}
    for handler, versions in handlers.items():
        if not isinstance(versions, dict):
            continue
        for version, routes in versions.items():
            if not isinstance(routes, dict):
                continue
            total = Observed()
            for leaf in routes.values():
                if isinstance(leaf, dict):
                    total += Observed(
                        int(leaf.get("items", 0)),
                        int(leaf.get("input_tokens", 0)),
                        int(leaf.get("output_tokens", 0)),
                    )
            out[(handler, version)] = total
    return out


OutputBasis = Literal["version", "handler", "max_output_tokens", "embedding"]


@dataclass(frozen=True)
class OutputGuess:
    """Output tokens expected per item, and what the figure rests on."""

    per_item: float
    basis: OutputBasis
    observed_items: int = 0

    def describe(self, max_output_tokens: int) -> str:
        if self.basis == "embedding":
            return "embeddings have no output tokens"
        if self.basis == "max_output_tokens":
            return f"max_output_tokens {max_output_tokens} per item: an upper bound"
        whose = "this handler version" if self.basis == "version" else "this handler (earlier versions)"
        return f"observed {self.per_item:,.1f} per item over {self.observed_items:,} results of {whose}"


def output_guess(
    observed: Mapping[tuple[str, str], Observed],
    handler: str,
    version: str,
    *,
    max_output_tokens: int,
    embedding: bool = False,
) -> OutputGuess:
    if embedding:
        return OutputGuess(0.0, "embedding")
    mine = observed.get((handler, version))
    if mine is not None and mine.items >= MIN_OBSERVED:
        return OutputGuess(min(mine.output_per_item, float(max_output_tokens)), "version", mine.items)
    pooled = sum((o for (h, _), o in observed.items() if h == handler), Observed())
    if pooled.items >= MIN_OBSERVED:
        return OutputGuess(min(pooled.output_per_item, float(max_output_tokens)), "handler", pooled.items)
    return OutputGuess(float(max_output_tokens), "max_output_tokens")


def expected_route(item: Item, *, rules: RoutingRules, flex: bool, now: datetime) -> str:
    """The route the daemon takes for ``item`` at intake (``core.routing.route``; ``flex``:
    this handler may go flex, ``core.routing.flex_allowed``), promotion aside."""
    decision = routing.route(item, endpoint="", model="", rules=rules, now=now, flex=flex)
    if isinstance(decision, FlexRoute):
        return "flex"
    return "batch" if isinstance(decision, BatchRoute) else "sync"


def packed_input_tokens(per_item: list[int], *, shared: int, pack: int) -> int:
    """Input tokens of items sent ``pack`` at a time: each pack carries the shared part
    (the system prompt) once instead of once per item. An approximation: the packed
    prompt's own framing (ids, the answer's layout) is not counted."""
    if pack <= 1 or not per_item:
        return sum(per_item)
    packs = -(-len(per_item) // pack)
    return max(0, sum(per_item) - (len(per_item) - packs) * shared)


@dataclass(frozen=True)
class RouteShare:
    route: str
    items: int
    input_tokens: int
    output_tokens: int
    usd: float | None

    def to_dict(self) -> dict[str, Any]:
        return self.__dict__.copy()


def mix_shares(
    routed: Iterable[tuple[str, int]],
    *,
    output_per_item: float,
    shared_tokens: int,
    pack: int,
    price: Price | None,
    batch_discount: float,
) -> list[RouteShare]:
    """Tokens and cost per route of items given as (route, input tokens)."""
    by_route: dict[str, list[int]] = {route: [] for route in ROUTES}
    for route, item_tokens in routed:
        by_route.setdefault(route, []).append(item_tokens)
    out = []
    for route, tokens in by_route.items():
        usage = Usage(
            packed_input_tokens(tokens, shared=shared_tokens, pack=pack), round(output_per_item * len(tokens))
        )
        out.append(
            RouteShare(
                route,
                len(tokens),
                usage.input_tokens,
                usage.output_tokens,
                cost_usd(usage, price, route=route, batch_discount=batch_discount) if tokens else 0.0,
            )
        )
    return out


def total_usd(shares: Iterable[RouteShare]) -> float | None:
    values = [s.usd for s in shares if s.items]
    if any(v is None for v in values):
        return None
    return round(sum(v for v in values if v is not None), 10)


def ratio(estimated: float | None, billed: float | None) -> float | None:
    """Estimate over billed; None when either is unknown or nothing was billed."""
    if estimated is None or not billed:
        return None
    return round(estimated / billed, 4)
