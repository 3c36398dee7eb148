"""Today's tallies for ``enrichd status``: results per hour and cost per route, per
replica, in a KV bucket (``<PREFIX>_STATS``). Each replica counts in memory and writes
its own key (``<day>.<instance>``) every few seconds and at shutdown, so there is no
contention; status adds the keys of the day up. A crash loses at most the last interval
of tallies, never an item: these are figures for people, not state."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.js import JetStreamContext
from nats.js.kv import KeyValue

from service.core.budget import budget_day
from service.state.streams import open_kv

log = logging.getLogger("enrichd.stats")


def _key_token(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]", "_", text)[:100] or "_"


def empty_day() -> dict[str, Any]:
    return {"cost_usd": {"sync": 0.0, "batch": 0.0}, "results": {"ok": 0, "error": 0}, "hours": {}}


def add_event(day: dict[str, Any], event: dict[str, Any], now: datetime) -> None:
    """Count one result event into a day's tally. Pure."""
    status = "ok" if event.get("status") == "ok" else "error"
    day["results"][status] = day["results"].get(status, 0) + 1
    hour = f"{now.astimezone(UTC).hour:02d}"
    day["hours"][hour] = day["hours"].get(hour, 0) + 1
    route = event.get("route") or "sync"
    if event.get("cost_usd"):
        day["cost_usd"][route] = day["cost_usd"].get(route, 0.0) + float(event["cost_usd"])


def merge(days: list[dict[str, Any]]) -> dict[str, Any]:
    out = empty_day()
    for day in days:
        for route, usd in day.get("cost_usd", {}).items():
            out["cost_usd"][route] = out["cost_usd"].get(route, 0.0) + usd
        for status, n in day.get("results", {}).items():
            out["results"][status] = out["results"].get(status, 0) + n
        for hour, n in day.get("hours", {}).items():
            out["hours"][hour] = out["hours"].get(hour, 0) + n
    return out


def per_hour(today: dict[str, Any], yesterday: dict[str, Any], now: datetime) -> float:
    """Results over the last 60 minutes: this hour so far plus the unexpired part of the
    previous hour (assumed spread evenly)."""
    utc = now.astimezone(UTC)
    before = utc - timedelta(hours=1)
    previous = (today if before.date() == utc.date() else yesterday)["hours"].get(f"{before.hour:02d}", 0)
    return float(today["hours"].get(f"{utc.hour:02d}", 0) + previous * (1 - utc.minute / 60))


class DailyStats:
    def __init__(self, kv: KeyValue, instance: str, *, clock: Callable[[], datetime]) -> None:
        self._kv = kv
        self._instance = _key_token(instance)
        self._clock = clock
        self._days: dict[str, dict[str, Any]] = {}
        self._dirty = False

    @classmethod
    async def open(
        cls, js: JetStreamContext, suffix: str, instance: str, *, replicas: int, clock: Callable[[], datetime]
    ) -> DailyStats:
        kv = await open_kv(js, f"{suffix}_STATS", replicas=replicas, ttl_s=3 * 86_400)
        stats = cls(kv, instance, clock=clock)
        await stats._load(budget_day(clock()))
        return stats

    async def _load(self, day: str) -> None:
        """Carry on from what this replica wrote before a restart."""
        try:
            entry = await self._kv.get(f"{day}.{self._instance}")
            self._days[day] = json.loads(entry.value or b"{}") or empty_day()
        except Exception:  # noqa: BLE001 - nothing written yet today
            self._days[day] = empty_day()

    def record(self, event: dict[str, Any]) -> None:
        now = self._clock()
        day = self._days.setdefault(budget_day(now), empty_day())
        add_event(day, event, now)
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
        while True:
            await asyncio.sleep(interval_s)
            try:
                await self.save()
            except Exception:  # noqa: BLE001 - NATS trouble: the next round writes it
                self._dirty = True
                log.debug("saving stats failed", exc_info=True)


async def read_days(
    js: JetStreamContext, suffix: str, now: datetime
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(today, yesterday), summed over every replica."""
    try:
        kv = await js.key_value(f"{suffix}_STATS")
    except Exception:  # noqa: BLE001 - no daemon has run yet
        return empty_day(), empty_day()
    today, yesterday = budget_day(now), budget_day(now - timedelta(days=1))
    found: dict[str, list[dict[str, Any]]] = {today: [], yesterday: []}
    try:
        keys = await kv.keys()
    except Exception:  # noqa: BLE001 - an empty bucket has no keys
        keys = []
    for key in keys:
        day = key.split(".", 1)[0]
        if day in found:
            entry = await kv.get(key)
            found[day].append(json.loads(entry.value or b"{}"))
    return merge(found[today]), merge(found[yesterday])
