"""Today's tallies for ``enrichd status`` and the observed tokens behind ``enrichd
estimate``: results per hour, cost per route and, per handler, handler version and
route, the tokens and cost of its paid ``ok`` results with what the estimate would have
said for them, per replica, in a KV bucket (``<PREFIX>_STATS``, kept 3 days). Each replica
counts in memory and writes its own key (``<day>.<instance>``) every few seconds and at
shutdown, so there is no contention; readers add the keys of a day up. A crash loses at
most the last interval of tallies, never an item: these are figures for people, not state.

A day's tally::

    {"cost_usd": {"sync": 0.0, "batch": 0.0, ...},      # billed, every result, by route
     "results": {"ok": 0, "error": 0},
     "hours": {"09": 12, ...},                           # results per UTC hour
     "handlers": {"<handler>": {"<handler_version>": {"<route>": {
         "items": 0,                    # ok results paid for (not cached)
         "input_tokens": 0, "output_tokens": 0, "cached_tokens": 0,   # as billed
         "billed_usd": 0.0,             # their cost_usd
         "estimated_output_tokens": 0,  # what the estimate expected (core.estimates)
         "estimated_usd": 0.0}}}}}      # billed input, estimated output, same prices

Days stored before ``handlers`` existed load as days without handler tallies."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from service.core.budget import budget_day
from service.core.cost import Price, Usage, cost_usd, price_for
from service.core.estimates import Observed, observed_from_tallies, output_guess
from service.state.streams import open_kv

log = logging.getLogger("enrichd.stats")

LEAF_KEYS = (
    "items",
    "input_tokens",
    "output_tokens",
    "cached_tokens",
    "billed_usd",
    "estimated_output_tokens",
    "estimated_usd",
)
NO_VERSION = "-"
REFRESH_EVERY = 12  # saves between re-reads of the other replicas' and earlier days' keys


def _key_token(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)[:100] or "_"


def empty_day() -> dict[str, Any]:
    return {
        "cost_usd": {"sync": 0.0, "batch": 0.0},
        "results": {"ok": 0, "error": 0},
        "hours": {},
        "handlers": {},
        "pipelines": {},
    }


@dataclass(frozen=True)
class HandlerFacts:
    """What the stats need of a configured handler to say what the estimate expected."""

    max_output_tokens: int
    embedding: bool = False


@dataclass(frozen=True)
class Paid:
    """An ``ok`` result that was paid for: its handler tally's coordinates and figures."""

    handler: str
    version: str
    route: str
    model: str | None
    usage: Usage
    cost_usd: float


def paid_result(event: dict[str, Any]) -> Paid | None:
    """The figures of an ``ok``, not cached result with usage; None for any other. Pure."""
    if event.get("status") != "ok" or event.get("cached"):
        return None
    usage = event.get("usage")
    if not isinstance(usage, dict):
        return None
    return Paid(
        handler=str(event.get("handler")),
        version=str(event.get("handler_version") or NO_VERSION),
        route=str(event.get("route") or "sync"),
        model=event.get("model"),
        usage=Usage(
            int(usage.get("input_tokens") or 0),
            int(usage.get("output_tokens") or 0),
            int(usage.get("cached_tokens") or 0),
        ),
        cost_usd=float(event.get("cost_usd") or 0.0),
    )


def add_event(
    day: dict[str, Any],
    event: dict[str, Any],
    now: datetime,
    *,
    estimate: tuple[int, float | None] | None = None,
) -> None:
    """Count one result event into a day's tally. ``estimate``: (output tokens, cost) the
    estimate expected for it, when it is a paid ``ok`` result. Pure.

    A pipeline (CONTRACT §14): each step's event (``step_of``, never published) counts
    its cost and tokens under its handler but is no result; the pipeline's final event
    is the result, counted with its steps (ok / error / skipped) under ``pipelines``, and
    its summed cost is not counted again."""
    status = "ok" if event.get("status") == "ok" else "error"
    if event.get("steps") is not None:
        _add_pipeline(day, event, status)
    if "step_of" not in event:
        day["results"][status] = day["results"].get(status, 0) + 1
        hour = f"{now.astimezone(UTC).hour:02d}"
        day["hours"][hour] = day["hours"].get(hour, 0) + 1
    if event.get("steps") is not None:
        return
    route = event.get("route") or "sync"
    if event.get("cost_usd"):
        day["cost_usd"][route] = day["cost_usd"].get(route, 0.0) + float(event["cost_usd"])
    paid = None if estimate is None else paid_result(event)
    if paid is None or estimate is None:
        return
    versions = day.setdefault("handlers", {}).setdefault(paid.handler, {})
    leaf = versions.setdefault(paid.version, {}).setdefault(paid.route, dict.fromkeys(LEAF_KEYS, 0))
    est_output, est_usd = estimate
    for key, value in (
        ("items", 1),
        ("input_tokens", paid.usage.input_tokens),
        ("output_tokens", paid.usage.output_tokens),
        ("cached_tokens", paid.usage.cached_tokens),
        ("billed_usd", paid.cost_usd),
        ("estimated_output_tokens", est_output),
        ("estimated_usd", est_usd or 0.0),
    ):
        leaf[key] = leaf.get(key, 0) + value


def _add_pipeline(day: dict[str, Any], event: dict[str, Any], status: str) -> None:
    tally = day.setdefault("pipelines", {}).setdefault(str(event.get("handler")), {})
    finished = tally.setdefault("finished", {})
    finished[status] = finished.get(status, 0) + 1
    steps = tally.setdefault("steps", {})
    for step in event.get("steps") or ():
        if isinstance(step, dict):
            counts = steps.setdefault(str(step.get("handler")), {})
            key = step.get("status", "ok")
            counts[key] = counts.get(key, 0) + 1
    for name in event.get("skipped") or ():
        counts = steps.setdefault(str(name), {})
        counts["skipped"] = counts.get("skipped", 0) + 1


def _add_tree(into: dict[str, Any], tree: Any) -> None:
    """Sum a nested dict of numbers into ``into`` (keys missing on either side are fine)."""
    if not isinstance(tree, dict):
        return
    for key, value in tree.items():
        if isinstance(value, dict):
            branch = into.setdefault(key, {})
            if isinstance(branch, dict):
                _add_tree(branch, value)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            current = into.get(key, 0)
            into[key] = (current if isinstance(current, int | float) else 0) + value


def merge(days: list[dict[str, Any]]) -> dict[str, Any]:
    out = empty_day()
    for day in days:
        for section in ("cost_usd", "results", "hours", "handlers", "pipelines"):
            _add_tree(out[section], day.get(section, {}))
    return out


def per_hour(today: dict[str, Any], yesterday: dict[str, Any], now: datetime) -> float:
    """Results over the last 60 minutes: this hour so far plus the unexpired part of the
    previous hour (assumed spread evenly)."""
    utc = now.astimezone(UTC)
    before = utc - timedelta(hours=1)
    previous = (today if before.date() == utc.date() else yesterday)["hours"].get(f"{before.hour:02d}", 0)
    return float(today["hours"].get(f"{utc.hour:02d}", 0) + previous * (1 - utc.minute / 60))


class DailyStats:
    """This replica's tallies. With ``facts`` (the configured handlers), each paid ``ok``
    result is also counted into its handler tally with what the estimate expected for it:
    the observed output per item *before* it (all replicas, the days kept, refreshed every
    :data:`REFRESH_EVERY` saves, plus this replica's own results as they come)."""

    def __init__(
        self,
        kv: KeyValue,
        instance: str,
        *,
        clock: Callable[[], datetime],
        facts: Mapping[str, HandlerFacts] | None = None,
        prices: Mapping[str, Price] | None = None,
        batch_discount: float = 0.5,
    ) -> None:
        self._kv = kv
        self._instance = _key_token(instance)
        self._clock = clock
        self._days: dict[str, dict[str, Any]] = {}
        self._dirty = False
        self._facts = dict(facts or {})
        self._prices = dict(prices or {})
        self._discount = batch_discount
        self._others: dict[tuple[str, str], Observed] = {}  # keys this replica does not hold
        self._seen: dict[tuple[str, str], Observed] = {}  # _others + this replica's days

    @classmethod
    async def open(
        cls,
        js: JetStreamContext,
        suffix: str,
        instance: str,
        *,
        replicas: int,
        clock: Callable[[], datetime],
        facts: Mapping[str, HandlerFacts] | None = None,
        prices: Mapping[str, Price] | None = None,
        batch_discount: float = 0.5,
    ) -> DailyStats:
        kv = await open_kv_bucket(js, suffix, replicas=replicas)
        stats = cls(kv, instance, clock=clock, facts=facts, prices=prices, batch_discount=batch_discount)
        await stats._load(budget_day(clock()))
        try:
            await stats.refresh()
        except Exception:  # noqa: BLE001 - figures for people: carry on with what we have
            log.debug("reading the observed tokens failed", exc_info=True)
        return stats

    async def _load(self, day: str) -> None:
        """Carry on from what this replica wrote before a restart."""
        try:
            entry = await self._kv.get(f"{day}.{self._instance}")
            self._days[day] = merge([json.loads(entry.value or b"{}") or {}])
        except Exception:  # noqa: BLE001 - nothing written yet today
            self._days[day] = empty_day()
        self._rebuild_seen()

    def _own_keys(self) -> set[str]:
        return {f"{day}.{self._instance}" for day in self._days}

    def _rebuild_seen(self) -> None:
        seen = dict(self._others)
        for tally in self._days.values():
            for key, observed in observed_from_tallies(tally.get("handlers", {})).items():
                seen[key] = seen.get(key, Observed()) + observed
        self._seen = seen

    async def refresh(self) -> None:
        """Re-read what other replicas (and this one on earlier days) observed."""
        own = self._own_keys()
        others: dict[tuple[str, str], Observed] = {}
        for key in await _keys(self._kv):
            if key in own:
                continue
            tally = await _get_json(self._kv, key)
            for where, observed in observed_from_tallies(tally.get("handlers", {})).items():
                others[where] = others.get(where, Observed()) + observed
        self._others = others
        self._rebuild_seen()

    def observed(self) -> dict[tuple[str, str], Observed]:
        return dict(self._seen)

    def _expected(self, paid: Paid) -> tuple[int, float | None] | None:
        facts = self._facts.get(paid.handler)
        if facts is None:  # not one of this replica's handlers (or no facts given)
            return None
        guess = output_guess(
            self._seen,
            paid.handler,
            paid.version,
            max_output_tokens=facts.max_output_tokens,
            embedding=facts.embedding,
        )
        tokens = round(guess.per_item)
        price = price_for(paid.model, self._prices) if paid.model else None
        usage = Usage(paid.usage.input_tokens, tokens, paid.usage.cached_tokens)
        return tokens, cost_usd(usage, price, route=paid.route, batch_discount=self._discount)

    def record(self, event: dict[str, Any]) -> None:
        now = self._clock()
        day = self._days.setdefault(budget_day(now), empty_day())
        try:
            paid = paid_result(event)
            estimate = None if paid is None else self._expected(paid)
        except Exception:  # noqa: BLE001 - figures for people never stop a result
            log.debug("estimating a result failed", exc_info=True)
            paid = estimate = None
        add_event(day, event, now, estimate=estimate)
        if paid is not None and estimate is not None:
            where = (paid.handler, paid.version)
            self._seen[where] = self._seen.get(where, Observed()) + Observed(
                1, paid.usage.input_tokens, paid.usage.output_tokens
            )
        self._dirty = True

    async def save(self) -> None:
        if not self._dirty:
            return
        self._dirty = False
        for day, tally in list(self._days.items()):
            await self._kv.put(f"{day}.{self._instance}", json.dumps(tally).encode())
        today = budget_day(self._clock())
        self._days = {d: t for d, t in self._days.items() if d == today}

    async def loop(self, interval_s: float = 5.0) -> None:
        rounds = 0
        while True:
            await asyncio.sleep(interval_s)
            rounds += 1
            try:
                await self.save()
                if self._facts and rounds % REFRESH_EVERY == 0:
                    await self.refresh()
            except Exception:  # noqa: BLE001 - NATS trouble: the next round writes it
                self._dirty = True
                log.debug("saving stats failed", exc_info=True)


def bucket_name(suffix: str) -> str:
    return f"{suffix}_STATS"


async def open_kv_bucket(js: JetStreamContext, suffix: str, *, replicas: int) -> KeyValue:
    return await open_kv(js, bucket_name(suffix), replicas=replicas, ttl_s=3 * 86_400)


async def _keys(kv: KeyValue) -> list[str]:
    try:
        return list(await kv.keys())
    except Exception:  # noqa: BLE001 - an empty bucket has no keys
        return []


async def _get_json(kv: KeyValue, key: str) -> dict[str, Any]:
    try:
        entry = await kv.get(key)
        value = json.loads(entry.value or b"{}")
    except Exception:  # noqa: BLE001 - expired or deleted meanwhile, or not ours
        return {}
    return value if isinstance(value, dict) else {}


async def read_all_days(js: JetStreamContext, suffix: str) -> dict[str, dict[str, Any]] | None:
    """Every day the bucket keeps (3 at most), each summed over every replica; None when
    no daemon has created the bucket yet."""
    try:
        kv = await js.key_value(bucket_name(suffix))
    except Exception:  # noqa: BLE001 - no daemon has run yet
        return None
    found: dict[str, list[dict[str, Any]]] = {}
    for key in await _keys(kv):
        found.setdefault(key.split(".", 1)[0], []).append(await _get_json(kv, key))
    return {day: merge(tallies) for day, tallies in sorted(found.items())}


async def read_days(
    js: JetStreamContext, suffix: str, now: datetime
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(today, yesterday), summed over every replica."""
    days = await read_all_days(js, suffix) or {}
    today, yesterday = budget_day(now), budget_day(now - timedelta(days=1))
    return days.get(today) or empty_day(), days.get(yesterday) or empty_day()


def observed_in(days: Mapping[str, dict[str, Any]]) -> dict[tuple[str, str], Observed]:
    """Observed tokens per (handler, version) over the given days."""
    return observed_from_tallies(merge(list(days.values()))["handlers"])
