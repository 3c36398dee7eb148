"""Alert rules (issue 6): when an operator should be told, decided from counts and ages.
PURE: time comes in as numbers (monotonic seconds for windows, Unix seconds for ages).

- ``failure_rate``: more than ``failure_rate`` of the results in the last ``window_s``
  were errors (once at least ``min_items`` results were seen in the window).
- ``retry_budget``: provider retries in the window exceed ``retry_budget`` times the
  first attempts (at least ``min_items`` first attempts seen), i.e. the provider is
  failing often enough that retrying costs real capacity.
- ``batch_sla``: a provider batch has been in flight longer than ``batch_sla_s``.

Each (kind, key) fires at most once per ``cooldown_s``.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class AlertRules:
    failure_rate: float = 0.05
    retry_budget: float = 0.2
    window_s: float = 300.0
    min_items: int = 20
    batch_sla_s: float = 24 * 3600.0
    cooldown_s: float = 900.0


@dataclass(frozen=True)
class Alert:
    kind: str
    key: str
    message: str
    details: dict[str, Any] = field(default_factory=dict)


class SlidingCount:
    """Counts of named things over the last ``window_s``, in ``buckets`` slices."""

    def __init__(self, window_s: float, buckets: int = 30) -> None:
        self._width = window_s / buckets
        self._buckets = buckets
        self._slices: deque[tuple[int, dict[str, int]]] = deque()

    def add(self, now: float, name: str, n: int = 1) -> None:
        index = int(now // self._width)
        if not self._slices or self._slices[-1][0] != index:
            self._slices.append((index, {}))
        counts = self._slices[-1][1]
        counts[name] = counts.get(name, 0) + n
        self._trim(index)

    def total(self, now: float, name: str) -> int:
        self._trim(int(now // self._width))
        return sum(counts.get(name, 0) for _, counts in self._slices)

    def _trim(self, index: int) -> None:
        while self._slices and self._slices[0][0] <= index - self._buckets:
            self._slices.popleft()


class AlertState:
    """Feed it outcomes, provider calls and batch ages; it answers with the alerts due."""

    def __init__(self, rules: AlertRules) -> None:
        self.rules = rules
        self._counts = SlidingCount(rules.window_s)
        self._fired: dict[tuple[str, str], float] = {}

    def outcome(self, now: float, *, ok: bool) -> Alert | None:
        self._counts.add(now, "ok" if ok else "error")
        errors = self._counts.total(now, "error")
        seen = errors + self._counts.total(now, "ok")
        if seen < self.rules.min_items or errors <= self.rules.failure_rate * seen:
            return None
        rate = errors / seen
        return self._once(
            now,
            Alert(
                "failure_rate",
                "all",
                f"{rate:.1%} of the last {seen} results were errors (threshold "
                f"{self.rules.failure_rate:.0%} over {self.rules.window_s:.0f}s)",
                {"rate": round(rate, 4), "errors": errors, "results": seen, "window_s": self.rules.window_s},
            ),
        )

    def call(self, now: float, *, retry: bool) -> Alert | None:
        self._counts.add(now, "retry" if retry else "first")
        if not retry:
            return None
        retries = self._counts.total(now, "retry")
        first = self._counts.total(now, "first")
        if first < self.rules.min_items or retries <= self.rules.retry_budget * first:
            return None
        return self._once(
            now,
            Alert(
                "retry_budget",
                "all",
                f"{retries} retries for {first} provider calls in {self.rules.window_s:.0f}s "
                f"(budget {self.rules.retry_budget:.0%})",
                {
                    "retries": retries,
                    "calls": first,
                    "ratio": round(retries / first, 4),
                    "budget": self.rules.retry_budget,
                    "window_s": self.rules.window_s,
                },
            ),
        )

    def batch_ages(self, now: float, wall_now: float, batches: Iterable[tuple[str, float]]) -> list[Alert]:
        """``batches``: (batch id, Unix time it was created) of batches in flight."""
        out = []
        for batch_id, created_at in batches:
            age = wall_now - created_at
            if age <= self.rules.batch_sla_s:
                continue
            alert = self._once(
                now,
                Alert(
                    "batch_sla",
                    batch_id,
                    f"batch {batch_id} has been in flight for {age / 3600:.1f} h "
                    f"(SLA {self.rules.batch_sla_s / 3600:.1f} h)",
                    {"batch_id": batch_id, "age_s": round(age), "sla_s": self.rules.batch_sla_s},
                ),
            )
            if alert is not None:
                out.append(alert)
        return out

    def _once(self, now: float, alert: Alert) -> Alert | None:
        last = self._fired.get((alert.kind, alert.key))
        if last is not None and now - last < self.rules.cooldown_s:
            return None
        self._fired[(alert.kind, alert.key)] = now
        return alert
