"""The batching policy (CONTRACT §5), pure: when must a buffer flush, and when may it.

A buffer flushes when any threshold is reached (``max_items``, ``max_bytes``, age of the
oldest item ≥ ``max_wait_s``), but only inside a flush window when windows are set.
Windows are cron-like, five fields ``minute hour day-of-month month day-of-week``
(``*``, ``a-b``, ``*/n``, ``a-b/n`` and lists ``a,b``; day-of-week 0-7, 0 and 7 = Sunday;
names ``JAN``-``DEC`` and ``SUN``-``SAT`` in any case). The same expression is a digest's
``schedule`` (service/core/schedules.py), read there as fire times (:meth:`Window.fires`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timedelta

PROVIDER_MAX_ITEMS = 50_000
PROVIDER_MAX_BYTES = 200_000_000


class WindowError(ValueError):
    """A window expression that cannot be parsed."""


_RANGES = ((0, 59), (0, 23), (1, 31), (1, 12), (0, 7))
_NAMES = ("minute", "hour", "day-of-month", "month", "day-of-week")
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_WEEKDAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")
_WORDS = {
    "month": {n: str(i + 1) for i, n in enumerate(_MONTHS)},
    "day-of-week": {n: str(i) for i, n in enumerate(_WEEKDAYS)},
}
_WORD_RE = re.compile(r"[A-Za-z]+")


def _numbers(text: str, name: str) -> str:
    """``MON-FRI`` as ``1-5``, ``JAN,JUL`` as ``1,7``; any other word is left for the
    field parser to refuse."""
    words = _WORDS.get(name, {})
    return _WORD_RE.sub(lambda m: words.get(m.group().upper(), m.group()), text)


def _parse_field(text: str, low: int, high: int, name: str) -> frozenset[int]:
    values: set[int] = set()
    for part in _numbers(text, name).split(","):
        step = 1
        if "/" in part:
            part, step_text = part.split("/", 1)
            if not step_text.isdigit() or int(step_text) < 1:
                raise WindowError(f"bad step in {name} field {text!r}")
            step = int(step_text)
        if part == "*":
            start, end = low, high
        elif "-" in part:
            a, b = part.split("-", 1)
            if not (a.isdigit() and b.isdigit()):
                raise WindowError(f"bad range in {name} field {text!r}")
            start, end = int(a), int(b)
        elif part.isdigit():
            start = end = int(part)
        else:
            raise WindowError(f"bad {name} field {text!r}")
        if not (low <= start <= end <= high):
            raise WindowError(f"{name} field {text!r} is outside {low}-{high}")
        values.update(range(start, end + 1, step))
    if name == "day-of-week" and 7 in values:  # 7 is Sunday too
        values = (values - {7}) | {0}
    return frozenset(values)


@dataclass(frozen=True)
class Window:
    minutes: frozenset[int]
    hours: frozenset[int]
    days: frozenset[int]
    months: frozenset[int]
    weekdays: frozenset[int]
    # Whether day-of-month / day-of-week were written as ``*`` (cron's rule in fires()).
    any_day: bool = True
    any_weekday: bool = True

    @classmethod
    def parse(cls, expr: str) -> Window:
        fields = expr.split()
        if len(fields) != 5:
            raise WindowError(f"window {expr!r} needs five fields: minute hour day month weekday")
        parsed = [_parse_field(f, lo, hi, n) for f, (lo, hi), n in zip(fields, _RANGES, _NAMES, strict=True)]
        minutes, hours, days, months, weekdays = parsed
        return cls(
            minutes,
            hours,
            days,
            months,
            weekdays,
            any_day=fields[2].startswith("*"),
            any_weekday=fields[4].startswith("*"),
        )

    def fires_on(self, day: date) -> bool:
        """Whether a cron schedule with these fields fires on ``day`` (at some minute):
        as in cron, when both day-of-month and day-of-week are restricted, either one
        matching is enough."""
        if day.month not in self.months:
            return False
        dom = day.day in self.days
        dow = (day.weekday() + 1) % 7 in self.weekdays
        if not self.any_day and not self.any_weekday:
            return dom or dow
        return dom and dow

    def contains(self, ts: datetime) -> bool:
        weekday = (ts.weekday() + 1) % 7  # Python: Monday=0; cron: Sunday=0
        return (
            ts.minute in self.minutes
            and ts.hour in self.hours
            and ts.day in self.days
            and ts.month in self.months
            and weekday in self.weekdays
        )


def in_windows(windows: list[Window], ts: datetime) -> bool:
    return not windows or any(w.contains(ts) for w in windows)


def next_window_start(
    windows: list[Window], ts: datetime, *, horizon_min: int = 8 * 24 * 60
) -> datetime | None:
    """The first minute at or after ``ts`` inside a window (None when none within a week+)."""
    if in_windows(windows, ts):
        return ts
    probe = ts.replace(second=0, microsecond=0) + timedelta(minutes=1)
    for _ in range(horizon_min):
        if in_windows(windows, probe):
            return probe
        probe += timedelta(minutes=1)
    return None


@dataclass(frozen=True)
class BatchPolicy:
    max_items: int = PROVIDER_MAX_ITEMS
    max_bytes: int = 190_000_000
    max_wait_s: float = 600.0
    windows: tuple[Window, ...] = ()

    def __post_init__(self) -> None:
        if not 1 <= self.max_items <= PROVIDER_MAX_ITEMS:
            raise ValueError(f"max_items must be 1..{PROVIDER_MAX_ITEMS}")
        if not 1 <= self.max_bytes <= PROVIDER_MAX_BYTES:
            raise ValueError(f"max_bytes must be 1..{PROVIDER_MAX_BYTES}")


@dataclass(frozen=True)
class BufferState:
    """What is waiting in one buffer: item count, bytes, and when the oldest arrived."""

    count: int
    bytes: int
    oldest: datetime | None


def flush_reason(policy: BatchPolicy, state: BufferState, now: datetime) -> str | None:
    """Why this buffer must flush now, or None. Windows gate every reason."""
    if state.count == 0:
        return None
    reason = None
    if state.count >= policy.max_items:
        reason = "max_items"
    elif state.bytes >= policy.max_bytes:
        reason = "max_bytes"
    elif state.oldest is not None and (now - state.oldest).total_seconds() >= policy.max_wait_s:
        reason = "max_wait_s"
    if reason is None or not in_windows(list(policy.windows), now):
        return None
    return reason


def until_next_check(policy: BatchPolicy, state: BufferState, now: datetime) -> float:
    """Seconds until the age threshold could fire (capped so new arrivals are seen)."""
    if state.count == 0 or state.oldest is None:
        return min(5.0, policy.max_wait_s)
    left = policy.max_wait_s - (now - state.oldest).total_seconds()
    return max(0.05, min(left, 5.0))


def take(sizes: list[int], *, max_items: int, max_bytes: int) -> int:
    """How many of the leading entries (with these JSONL line sizes) fit in one batch
    file: never more than ``max_items`` lines or ``max_bytes`` bytes, and at least one."""
    total = 0
    for n, size in enumerate(sizes[:max_items]):
        if n > 0 and total + size > max_bytes:
            return n
        total += size
    return min(len(sizes), max_items)
