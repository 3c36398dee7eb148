"""Budget arithmetic, pure: which budget day it is, whether a cost still fits.

A budget day is a UTC calendar day. Spending is *reserved* before a call at its upper
bound (prompt + max output tokens) and corrected afterwards, so concurrent calls on
several replicas can never together cross the cap."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


def budget_day(now: datetime) -> str:
    return now.astimezone(UTC).strftime("%Y%m%d")


def seconds_until_next_day(now: datetime) -> float:
    utc = now.astimezone(UTC)
    tomorrow = (utc + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return (tomorrow - utc).total_seconds()


@dataclass(frozen=True)
class Caps:
    """USD per day: for everything, and per handler (either may be absent)."""

    daily_usd: float | None
    handlers: dict[str, float]

    def scopes(self, handler: str) -> list[tuple[str, float]]:
        out = []
        if self.daily_usd is not None:
            out.append(("all", self.daily_usd))
        if handler in self.handlers:
            out.append((f"h-{handler}", self.handlers[handler]))
        return out


def fits(spent_usd: float, cost_usd: float, cap_usd: float) -> bool:
    return spent_usd + cost_usd <= cap_usd + 1e-12


def exceeded_events(
    *, day: str, scope: str, cap_usd: float, spent_usd: float, at: str, instance: str
) -> tuple[dict[str, object], dict[str, object]]:
    """The ``budget.exceeded`` payload and the ``alert`` that goes with it."""
    body: dict[str, object] = {
        "day": day,
        "scope": scope,
        "cap_usd": cap_usd,
        "spent_usd": round(spent_usd, 8),
        "at": at,
    }
    alert: dict[str, object] = {
        "kind": "budget_exceeded",
        "key": scope,
        "message": f"daily budget {scope} spent: ${spent_usd:.4f} of ${cap_usd:.4f} on {day}",
        "instance": instance,
        **body,
    }
    return body, alert
