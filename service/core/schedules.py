"""Digest windows (CONTRACT §15), pure: time is passed in, the time zone too.

A schedule cuts time into consecutive windows ``[start, end)``:

- ``every = "15m"`` (units ``s``, ``m``, ``h``, ``d``, ``w``): windows of that length
  aligned to the Unix epoch (``"1d"`` starts at 00:00 UTC; ``"7d"``/``"1w"`` on Thursdays,
  the epoch's weekday: write a ``schedule`` for weeks that start on another day);
- ``schedule = "0 18 * * FRI"``: five-field cron (service/core/batching.py's
  :class:`Window`), fire times read as wall-clock time in the digest time zone; a window
  runs from one fire time to the next. A wall-clock time that does not exist (the hour a
  DST change skips) is no fire time; one that happens twice fires at its first occurrence.

Every boundary returned is an aware UTC datetime."""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta, tzinfo

from service.core.batching import Window, WindowError

UNITS_S = {"s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 7 * 86_400}
_EVERY_RE = re.compile(r"^\s*(\d+)\s*([smhdw])\s*$")
# How far a cron schedule is searched for its next fire time (``0 0 29 2 *`` fires once
# in four years, ``0 0 31 2 *`` never).
HORIZON_DAYS = 8 * 366


class ScheduleError(ValueError):
    """An ``every`` or ``schedule`` that cannot be used."""


def parse_every(text: str) -> int:
    """``"30s"`` → 30, ``"7d"`` → 604800 (whole seconds, at least 1)."""
    match = _EVERY_RE.match(text) if isinstance(text, str) else None
    if match is None:
        raise ScheduleError(f"bad duration {text!r} (a whole number and one of s, m, h, d, w: '15m')")
    seconds = int(match.group(1)) * UNITS_S[match.group(2)]
    if seconds < 1:
        raise ScheduleError(f"bad duration {text!r} (must be at least 1s)")
    return seconds


@dataclass(frozen=True)
class Every:
    """Fixed windows of ``seconds``, aligned to the Unix epoch."""

    seconds: int

    def last_at_or_before(self, t: datetime) -> datetime:
        epoch = math.floor(t.timestamp() / self.seconds) * self.seconds
        return datetime.fromtimestamp(epoch, UTC)

    def next_after(self, t: datetime) -> datetime:
        start = self.last_at_or_before(t)
        return start + timedelta(seconds=self.seconds)


@dataclass(frozen=True)
class Cron:
    """A cron expression's fire times, in ``tz``."""

    window: Window
    tz: tzinfo

    @classmethod
    def parse(cls, expr: str, tz: tzinfo) -> Cron:
        try:
            window = Window.parse(expr)
        except WindowError as exc:
            raise ScheduleError(f"bad cron {expr!r} ({exc})") from None
        cron = cls(window, tz)
        try:
            cron.next_after(datetime(2000, 1, 1, tzinfo=UTC))
        except ScheduleError:
            raise ScheduleError(f"bad cron {expr!r} (it never fires)") from None
        return cron

    def _fires(self, day: date, *, reverse: bool) -> Iterator[datetime]:
        """The fire times of one local day, in order (or reversed), as UTC."""
        w = self.window
        if not w.fires_on(day):
            return
        for hour in sorted(w.hours, reverse=reverse):
            for minute in sorted(w.minutes, reverse=reverse):
                local = datetime(day.year, day.month, day.day, hour, minute, tzinfo=self.tz)
                as_utc = local.astimezone(UTC)
                if as_utc.astimezone(self.tz).replace(tzinfo=None) != local.replace(tzinfo=None):
                    continue  # skipped by a DST change: no such wall-clock time
                yield as_utc

    def next_after(self, t: datetime) -> datetime:
        day = t.astimezone(self.tz).date() - timedelta(days=1)  # a fold may start the day before
        for _ in range(HORIZON_DAYS):
            for fire in self._fires(day, reverse=False):
                if fire > t:
                    return fire
            day += timedelta(days=1)
        raise ScheduleError("the schedule does not fire within eight years")

    def last_at_or_before(self, t: datetime) -> datetime:
        day = t.astimezone(self.tz).date() + timedelta(days=1)
        for _ in range(HORIZON_DAYS):
            for fire in self._fires(day, reverse=True):
                if fire <= t:
                    return fire
            day -= timedelta(days=1)
        raise ScheduleError("the schedule did not fire within eight years")


Schedule = Every | Cron


def window_at(schedule: Schedule, t: datetime) -> tuple[datetime, datetime]:
    """The window holding ``t``: ``start <= t < end``."""
    return schedule.last_at_or_before(t), schedule.next_after(t)


def window_from(schedule: Schedule, start: datetime) -> tuple[datetime, datetime]:
    """The window that begins at ``start`` (a previous window's end): ``[start, next fire)``.
    ``start`` need not be a fire time (the schedule changed): then the window is the part
    up to the next one, so no moment falls in two windows or none."""
    return start, schedule.next_after(start)


def windows_between(schedule: Schedule, start: datetime, until: datetime, *, limit: int) -> int:
    """How many whole windows from ``start`` end at or before ``until`` (at most ``limit``)."""
    n, at = 0, start
    while n < limit:
        at = schedule.next_after(at)
        if at > until:
            break
        n += 1
    return n


def skip_to(schedule: Schedule, start: datetime, until: datetime, *, keep: int) -> datetime:
    """The start of the oldest of the last ``keep`` windows that end by ``until`` (the
    backlog cap): windows before it are skipped. ``start`` when there are no more."""
    ends: list[datetime] = []
    at = start
    while True:
        nxt = schedule.next_after(at)
        if nxt > until:
            break
        ends.append(at)  # the start of a window that closed by ``until``
        at = nxt
        if len(ends) > keep:
            ends.pop(0)
    return ends[0] if ends else start


def longest_window_s(schedule: Schedule, t: datetime, *, samples: int = 16) -> float:
    """The longest of the next ``samples`` windows (a monthly cron: 31 days)."""
    if isinstance(schedule, Every):
        return float(schedule.seconds)
    longest, at = 0.0, schedule.last_at_or_before(t)
    for _ in range(samples):
        nxt = schedule.next_after(at)
        longest = max(longest, (nxt - at).total_seconds())
        at = nxt
    return longest
