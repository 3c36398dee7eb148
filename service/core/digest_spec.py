"""The ``[digests]`` settings (CONTRACT §15), read into typed specs. Pure: the time zone is
looked up by the caller (``tz_of``), which knows where the zone database lives.

```toml
[digests]
timezone = "UTC"               # the zone cron schedules are read in
grace_s = 2                    # a window closes this long after its end
[digests.weekly_review]
source = "summarize"           # a handler or pipeline whose ok results are collected
schedule = "0 18 * * FRI"      # or every = "7d"
group_by = "metadata.mailbox"  # optional
handler = "review"
```

Every refusal is one :class:`DigestConfigError` naming the key."""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import tzinfo
from typing import Any

from service.core.schedules import Cron, Every, Schedule, ScheduleError, parse_every

NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
DIGEST_KEYS = frozenset({"source", "schedule", "every", "group_by", "handler", "context_tokens"})
# Where a group_by path may start: the parts of a result event that describe the item.
GROUP_ROOTS = frozenset({"metadata", "source", "result", "model", "route", "handler_version"})


class DigestConfigError(ValueError):
    """A digest definition that cannot be used; ``key`` is the setting's dotted name."""

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key


@dataclass(frozen=True)
class DigestSpec:
    """One ``[digests.<name>]``."""

    name: str
    source: str
    handler: str
    schedule: Schedule
    schedule_text: str  # as written: "every 30s" or the cron expression
    group_by: tuple[str, ...] | None = None  # ("metadata", "mailbox")
    context_tokens: int | None = None  # None: packing.context_tokens

    @property
    def group_key(self) -> str | None:
        return None if self.group_by is None else ".".join(self.group_by)


@dataclass(frozen=True)
class DigestSettings:
    """``[digests]``: the shared keys and every digest."""

    specs: tuple[DigestSpec, ...] = ()
    timezone: str = "UTC"
    grace_s: float = 2.0  # a window closes once now >= end + grace_s (in-flight publishes land)
    lease_s: float = 60.0  # a replica running a window holds it this long between renewals
    max_backlog: int = 100  # windows closed while no daemon ran that are still run
    max_attempts: int = 3  # runs of a window/group that failed transiently before an error event
    check_s: float = 1.0  # how often the loop looks at its digests

    def __bool__(self) -> bool:
        return bool(self.specs)


_NUMBERS: dict[str, tuple[type, float]] = {
    "grace_s": (float, 0.0),
    "lease_s": (float, 5.0),
    "max_backlog": (int, 1.0),
    "max_attempts": (int, 1.0),
    "check_s": (float, 0.05),
}


def _number(key: str, value: Any) -> float:
    kind, low = _NUMBERS[key]
    ok = isinstance(value, int | float) and not isinstance(value, bool)
    if isinstance(value, str):  # from an ENRICHD_DIGESTS__... variable
        try:
            value, ok = float(value), True
        except ValueError:
            ok = False
    if not ok or value < low or (kind is int and float(value) != int(value)):
        what = "a whole number" if kind is int else "a number"
        raise DigestConfigError(f"digests.{key}", f"must be {what} >= {low:g}, got {value!r}")
    return int(value) if kind is int else float(value)


def parse_digests(
    raw: Mapping[str, Any],
    *,
    tz_of: Callable[[str], tzinfo],
    handlers: Mapping[str, bool],
    pipelines: Collection[str],
) -> DigestSettings:
    """``raw``: the ``[digests]`` table. ``handlers``: name → whether it is a chat handler
    (a digest's handler must be; an embedding has nothing to summarise with); ``pipelines``:
    the pipeline names. ``tz_of`` raises (any exception) for an unknown zone."""
    timezone = raw.get("timezone", "UTC")
    if not isinstance(timezone, str):
        raise DigestConfigError("digests.timezone", "must be an IANA time zone name such as 'Europe/Paris'")
    try:
        tz = tz_of(timezone)
    except Exception:  # noqa: BLE001 - whatever the zone lookup raises, the message is the same
        raise DigestConfigError(
            "digests.timezone", f"unknown time zone {timezone!r} (an IANA name such as 'Europe/Paris')"
        ) from None
    numbers: dict[str, Any] = {}
    specs: list[DigestSpec] = []
    for key, value in raw.items():
        if key == "timezone":
            continue
        if key in _NUMBERS:
            numbers[key] = _number(key, value)
        elif isinstance(value, Mapping):
            specs.append(_spec(key, value, tz=tz, handlers=handlers, pipelines=pipelines))
        else:
            raise DigestConfigError(
                f"digests.{key}", "unknown setting (a digest is a table: [digests.<name>])"
            )
    return DigestSettings(specs=tuple(specs), timezone=timezone, **numbers)


def _spec(
    name: str,
    table: Mapping[str, Any],
    *,
    tz: tzinfo,
    handlers: Mapping[str, bool],
    pipelines: Collection[str],
) -> DigestSpec:
    key = f"digests.{name}"
    if not NAME_RE.match(name):
        raise DigestConfigError(key, "a digest name is 1-64 letters, digits, '-' and '_'")
    if name in handlers or name in pipelines:
        kind = "handler" if name in handlers else "pipeline"
        raise DigestConfigError(
            key, f"the name is taken by a {kind} (they share enrich.out.<name>): choose another"
        )
    unknown = sorted(set(table) - DIGEST_KEYS)
    if unknown:
        raise DigestConfigError(f"{key}.{unknown[0]}", "unknown key")
    source = table.get("source")
    if not isinstance(source, str) or not source:
        raise DigestConfigError(
            f"{key}.source", "required: the handler or pipeline whose results are collected"
        )
    if source not in handlers and source not in pipelines:
        raise DigestConfigError(f"{key}.source", f"no handler or pipeline named {source!r}")
    handler = table.get("handler")
    if not isinstance(handler, str) or not handler:
        raise DigestConfigError(f"{key}.handler", "required: the handler run on the window's results")
    if handler not in handlers:
        raise DigestConfigError(f"{key}.handler", f"no handler named {handler!r}")
    if not handlers[handler]:
        raise DigestConfigError(
            f"{key}.handler", f"{handler!r} is an embedding handler: a digest needs a chat one"
        )
    schedule, text = _schedule(key, table, tz)
    return DigestSpec(
        name=name,
        source=source,
        handler=handler,
        schedule=schedule,
        schedule_text=text,
        group_by=_group_by(key, table.get("group_by")),
        context_tokens=_context(key, table.get("context_tokens")),
    )


def _schedule(key: str, table: Mapping[str, Any], tz: tzinfo) -> tuple[Schedule, str]:
    has_every, has_cron = "every" in table, "schedule" in table
    if has_every == has_cron:
        raise DigestConfigError(key, "set one of every or schedule")
    if has_every:
        value = table["every"]
        try:
            return Every(parse_every(value)), f"every {value}"
        except ScheduleError as exc:
            raise DigestConfigError(f"{key}.every", str(exc)) from None
    expr = table["schedule"]
    if not isinstance(expr, str):
        raise DigestConfigError(f"{key}.schedule", "must be a five-field cron string such as '0 18 * * FRI'")
    try:
        return Cron.parse(expr, tz), expr
    except ScheduleError as exc:
        raise DigestConfigError(f"{key}.schedule", str(exc)) from None


def _group_by(key: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    parts = tuple(value.split(".")) if isinstance(value, str) else ()
    if not parts or not all(parts) or parts[0] not in GROUP_ROOTS:
        roots = ", ".join(sorted(GROUP_ROOTS))
        raise DigestConfigError(
            f"{key}.group_by", f"bad path {value!r} (a dotted path into the result event starting at {roots})"
        )
    return parts


def _context(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, str) and value.isdigit():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 256:
        raise DigestConfigError(f"{key}.context_tokens", f"must be a whole number >= 256, got {value!r}")
    return value
