"""``enrichd estimate``: tokens and cost of enriching files, computed locally (tiktoken +
the price table + the handler's observed output tokens from the daily stats), without
calling the provider. The arithmetic is ``service.core.estimates``; the formula is in the
README ("Handler versions and estimates")."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from handlers import HandlerSpec
from service.cli.admin import AdminError, connect
from service.cli.submit import load_items
from service.cli.views import money
from service.contract.subjects import Subjects
from service.core.cost import Usage, cost_usd, price_for, supports_flex
from service.core.errors import BadItemError
from service.core.estimates import (
    Observed,
    OutputGuess,
    expected_route,
    mix_shares,
    output_guess,
    packed_input_tokens,
    total_usd,
)
from service.core.items import item_from_object
from service.core.routing import flex_allowed
from service.core.tokens import TOKENS_PER_MESSAGE, count_tokens, estimate_request_tokens
from service.settings import Settings
from service.state.stats import observed_in, read_all_days
from service.wiring import routing_rules


@dataclass(frozen=True)
class Estimate:
    handler: str
    model: str
    handler_version: str
    pack: int
    items: int
    bad_items: int
    input_tokens: int  # tiktoken, packs sharing their system prompt
    output_tokens: int  # expected: output_per_item per item
    output_per_item: float
    output_basis: str  # "version" | "handler" | "max_output_tokens" | "embedding"
    output_note: str
    observed_items: int
    observed_input_per_item: float | None
    max_output_tokens: int  # the upper bound: max_output_tokens per item
    sync_usd: float | None  # every item sync
    batch_usd: float | None  # every item batch
    max_sync_usd: float | None  # every item sync at max_output_tokens
    max_batch_usd: float | None
    mix: dict[str, dict[str, Any]] = field(default_factory=dict)  # route -> items, tokens, usd
    mix_usd: float | None = None
    stats: str = "not read"  # where the observed tokens came from, or why there are none

    def to_dict(self) -> dict[str, object]:
        return self.__dict__.copy()


async def read_observed(settings: Settings) -> tuple[dict[tuple[str, str], Observed] | None, str]:
    """Observed tokens per (handler, version) over the days the stats keep, and a note;
    (None, why) when NATS cannot be reached."""
    try:
        async with connect(settings) as nc:
            days = await read_all_days(nc.jetstream(), Subjects(settings.nats.subject_prefix).stream_suffix)
    except AdminError as exc:
        return None, f"stats not read: {exc}"
    if not days:
        return {}, "read from NATS: no results recorded yet"
    first, last = min(days), max(days)
    return observed_in(days), f"read from NATS, UTC days {first}" + ("" if first == last else f" to {last}")


def shared_tokens(spec: HandlerSpec) -> int:
    """The part of a request a pack carries once: the system message."""
    return count_tokens(spec.system) + count_tokens("system") + TOKENS_PER_MESSAGE if spec.system else 0


def estimate(
    settings: Settings,
    handler: str,
    paths: list[Path],
    *,
    priority: str | None = None,
    observed: dict[tuple[str, str], Observed] | None = None,
    stats_note: str = "not read (--offline)",
    now: datetime | None = None,
) -> Estimate:
    if handler not in settings.registry:
        raise ValueError(f"no handler named {handler!r} (configured: {', '.join(sorted(settings.registry))})")
    records = load_items(handler, paths, priority)
    return estimate_records(settings, handler, records, observed=observed, stats_note=stats_note, now=now)


def estimate_records(
    settings: Settings,
    handler: str,
    records: list[dict[str, Any]],
    *,
    observed: dict[tuple[str, str], Observed] | None = None,
    stats_note: str = "not read",
    now: datetime | None = None,
) -> Estimate:
    """The estimate of items given as decoded objects (e.g. for a benchmark that compares
    it with what was billed)."""
    spec = settings.registry[handler]
    now = now or datetime.now(UTC)
    rules = routing_rules(settings)
    flex = flex_allowed(
        handler_flex=spec.flex,
        routing_flex=settings.routing.flex,
        model_has_flex=supports_flex(spec.model, settings.price_table),
        chat=not spec.is_embedding,
    )
    routed: list[tuple[str, int]] = []
    bad = 0
    for record in records:
        try:
            item = item_from_object(record, handler)
            body = spec.build_body(item, max_tokens_param=settings.openai.max_tokens_param)
        except BadItemError:
            bad += 1
            continue
        routed.append(
            (
                expected_route(item, rules=rules, flex=flex, now=now),
                estimate_request_tokens(body),
            )
        )
    guess = output_guess(
        observed or {},
        handler,
        spec.version,
        max_output_tokens=spec.max_output_tokens,
        embedding=spec.is_embedding,
    )
    return _assemble(settings, spec, routed, bad, guess, observed or {}, stats_note)


def _assemble(
    settings: Settings,
    spec: HandlerSpec,
    routed: list[tuple[str, int]],
    bad: int,
    guess: OutputGuess,
    observed: dict[tuple[str, str], Observed],
    stats_note: str,
) -> Estimate:
    price = price_for(spec.model, settings.price_table)
    discount = settings.batch_discount
    n = len(routed)
    shared = shared_tokens(spec)
    input_tokens = packed_input_tokens([t for _, t in routed], shared=shared, pack=spec.pack)
    bound = 0 if spec.is_embedding else spec.max_output_tokens * n
    expected = Usage(input_tokens, round(guess.per_item * n))
    ceiling = Usage(input_tokens, bound)
    shares = mix_shares(
        routed,
        output_per_item=guess.per_item,
        shared_tokens=shared,
        pack=spec.pack,
        price=price,
        batch_discount=discount,
    )
    mine = observed.get((spec.name, spec.version))
    return Estimate(
        handler=spec.name,
        model=spec.model,
        handler_version=spec.version,
        pack=spec.pack,
        items=n,
        bad_items=bad,
        input_tokens=input_tokens,
        output_tokens=expected.output_tokens,
        output_per_item=round(guess.per_item, 2),
        output_basis=guess.basis,
        output_note=guess.describe(spec.max_output_tokens),
        observed_items=guess.observed_items,
        observed_input_per_item=None if mine is None or not mine.items else round(mine.input_per_item, 2),
        max_output_tokens=bound,
        sync_usd=cost_usd(expected, price, route="sync", batch_discount=discount),
        batch_usd=cost_usd(expected, price, route="batch", batch_discount=discount),
        max_sync_usd=cost_usd(ceiling, price, route="sync", batch_discount=discount),
        max_batch_usd=cost_usd(ceiling, price, route="batch", batch_discount=discount),
        mix={s.route: {k: v for k, v in s.to_dict().items() if k != "route"} for s in shares},
        mix_usd=total_usd(shares),
        stats=stats_note,
    )


def render(result: Estimate) -> list[str]:
    """The text lines of ``enrichd estimate``."""

    def usd(value: float | None) -> str:
        return "no price for this model" if value is None else money(value)

    mix = result.mix
    lines = [
        f"{result.items} item(s) for {result.handler} on {result.model} "
        f"(handler version {result.handler_version}, pack {result.pack})"
        + (f"; {result.bad_items} bad, not counted" if result.bad_items else ""),
        f"input tokens:   {result.input_tokens:,} (tiktoken"
        + (", packs share the system prompt" if result.pack > 1 else "")
        + ")",
        f"output tokens:  {result.output_tokens:,} ({result.output_note})",
        "route mix:      " + " / ".join(f"{route} {mix[route]['items']}" for route in mix),
        f"expected cost:  {usd(result.mix_usd)} for this mix ("
        + " / ".join(f"{route} {usd(mix[route]['usd'])}" for route in mix)
        + ")",
        f"all sync:       {usd(result.sync_usd)} (at most {usd(result.max_sync_usd)} at max_output_tokens)",
        f"all batch:      {usd(result.batch_usd)} (at most {usd(result.max_batch_usd)})",
        f"observed:       {result.stats}",
    ]
    return lines
