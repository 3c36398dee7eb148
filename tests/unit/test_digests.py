"""Digests, the pure parts: window math (every, cron with names and time zones), the
members and groups of a window, the reduction planner, and the settings' refusals."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from service.core import digests as core
from service.core.batching import Window
from service.core.schedules import (
    Cron,
    Every,
    ScheduleError,
    longest_window_s,
    parse_every,
    skip_to,
    window_at,
    window_from,
    windows_between,
)
from service.settings import ConfigError, load_settings


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [("30s", 30), ("15m", 900), ("6h", 21600), ("7d", 604800), ("2w", 1209600), (" 5 s ", 5)],
)
def test_every_parses_units(text: str, seconds: int) -> None:
    assert parse_every(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "5x", "-5s", "0s", "1.5h", "m"])
def test_every_refuses_bad_durations(text: str) -> None:
    with pytest.raises(ScheduleError):
        parse_every(text)


def test_every_windows_are_aligned_to_the_epoch() -> None:
    every = Every(900)
    assert window_at(every, utc(2026, 12, 4, 10, 7, 30)) == (
        utc(2026, 12, 4, 10, 0),
        utc(2026, 12, 4, 10, 15),
    )
    # a boundary belongs to the window it starts
    assert window_at(every, utc(2026, 12, 4, 10, 15)) == (utc(2026, 12, 4, 10, 15), utc(2026, 12, 4, 10, 30))
    week = Every(parse_every("7d"))
    start, end = window_at(week, utc(2026, 12, 4, 12))
    assert start.weekday() == 3 and end - start == timedelta(days=7)  # the epoch was a Thursday


def test_cron_weekly_in_a_time_zone() -> None:
    paris = ZoneInfo("Europe/Paris")
    cron = Cron.parse("0 18 * * FRI", paris)
    start, end = window_at(cron, utc(2026, 12, 2, 12))  # a Wednesday
    assert start == utc(2026, 11, 27, 17) and end == utc(2026, 12, 4, 17)  # 18:00 Paris = 17:00 UTC in winter
    assert cron.next_after(end) == utc(2026, 12, 11, 17)
    summer = window_at(cron, utc(2026, 7, 1))
    assert summer[1] == utc(2026, 7, 3, 16)  # 18:00 Paris = 16:00 UTC in summer


def test_cron_names_ranges_lists_and_steps() -> None:
    w = Window.parse("*/15 9-17 * JAN,jul mon-FRI")
    assert w.minutes == {0, 15, 30, 45} and w.hours == set(range(9, 18))
    assert w.months == {1, 7} and w.weekdays == {1, 2, 3, 4, 5}
    assert Window.parse("0 0 * * 7").weekdays == {0}  # 7 is Sunday too
    cron = Cron.parse("30 9 * * MON-FRI", UTC)
    assert cron.next_after(utc(2026, 12, 4, 9, 30)) == utc(2026, 12, 7, 9, 30)  # Friday -> Monday


def test_cron_day_of_month_or_day_of_week_when_both_are_set() -> None:
    cron = Cron.parse("0 0 1 * MON", UTC)  # cron: the 1st OR a Monday
    fires = [utc(2026, 11, 30)]
    while len(fires) < 4:
        fires.append(cron.next_after(fires[-1]))
    assert fires == [utc(2026, 11, 30), utc(2026, 12, 1), utc(2026, 12, 7), utc(2026, 12, 14)]


def test_cron_across_daylight_saving_changes() -> None:
    paris = ZoneInfo("Europe/Paris")
    cron = Cron.parse("30 2 * * *", paris)  # 02:30 does not exist on 2026-03-29 in Paris
    assert cron.next_after(utc(2026, 3, 28, 1, 30)) == utc(2026, 3, 30, 0, 30)
    hourly = Cron.parse("0 * * * *", paris)  # 02:00 happens twice on 2026-10-25: fires once
    fires = [utc(2026, 10, 24, 23)]
    while fires[-1] < utc(2026, 10, 25, 3):
        fires.append(hourly.next_after(fires[-1]))
    assert len(fires) == len(set(fires)) and all(b > a for a, b in zip(fires, fires[1:], strict=False))


@pytest.mark.parametrize("expr", ["0 18 * *", "0 25 * * *", "0 0 * * FUNDAY", "0 0 31 2 *", "x * * * *"])
def test_bad_cron_is_refused(expr: str) -> None:
    with pytest.raises(ScheduleError):
        Cron.parse(expr, UTC)


def test_backlog_and_partial_windows() -> None:
    every = Every(60)
    start = utc(2026, 12, 4, 10)
    assert windows_between(every, start, utc(2026, 12, 4, 12), limit=1000) == 120
    # keep the last 100 windows that closed by 12:00: 10:20 .. 11:59
    assert skip_to(every, start, utc(2026, 12, 4, 12), keep=100) == utc(2026, 12, 4, 10, 20)
    assert skip_to(every, start, utc(2026, 12, 4, 10, 30), keep=100) == start
    # a cursor that is no boundary (the schedule changed): the part up to the next one
    assert window_from(every, utc(2026, 12, 4, 10, 0, 20)) == (
        utc(2026, 12, 4, 10, 0, 20),
        utc(2026, 12, 4, 10, 1),
    )
    assert longest_window_s(Cron.parse("0 0 1 * *", UTC), utc(2026, 12, 4)) == 31 * 86400


def ok(item_id: str, result: Any, **more: Any) -> dict[str, Any]:
    return {"id": item_id, "status": "ok", "result": result, **more}


def test_members_are_ok_results_once_each_the_last_one_kept() -> None:
    events = [
        ok("a", "first"),
        {"id": "b", "status": "error", "result": None},
        ok("c", {"label": "x"}),
        ok("a", "second\nline"),
    ]
    groups = core.split_groups(events, None)
    assert list(groups) == [None]
    assert [(m.id, m.line) for m in groups[None]] == [("c", '[c] {"label":"x"}'), ("a", "[a] second line")]


def test_groups_by_a_path_into_the_event() -> None:
    events = [
        ok("a", "x", metadata={"mailbox": "ops"}),
        ok("b", "y", metadata={"mailbox": "sales"}),
        ok("c", "z"),
        ok("d", "w", metadata={"mailbox": "ops"}),
    ]
    groups = core.split_groups(events, ("metadata", "mailbox"))
    assert list(groups) == [None, "ops", "sales"]
    assert [m.id for m in groups["ops"]] == ["a", "d"]
    assert core.group_of(ok("e", {"n": 2}), ("result", "n")) == "2"
    assert core.group_token(None) == "all" and core.group_token("ops") != core.group_token("sales")


def test_ids_are_deterministic_per_window_and_group() -> None:
    start = utc(2026, 12, 4, 10)
    assert core.event_id("weekly", start, "ops") == core.event_id("weekly", start, "ops")
    assert core.digest_msg_id("weekly", start, None) == "weekly:2026-12-04T10:00:00.000Z:all"
    assert core.call_id("weekly", start, None, 1, 3) == f"weekly.{int(start.timestamp())}.all.L1.C3"


def test_planner_packs_lines_in_order_within_the_budget() -> None:
    assert core.plan_chunks([10, 10, 10, 10], 25) == [[0, 1], [2, 3]]
    assert core.plan_chunks([10, 30, 5, 5], 25) == [[0], [1], [2, 3]]  # a line too large is alone
    assert core.plan_chunks([5] * 4, 100) == [[0, 1, 2, 3]]
    assert core.plan_chunks([], 10) == []


def test_cut_line_fits_the_budget() -> None:
    def count(text: str) -> int:
        return len(text.split())

    line = " ".join(f"w{i}" for i in range(100))
    cut = core.cut_line(line, 20, count)
    assert count(cut) <= 20 and cut.endswith("...") and cut.startswith("w0 w1")
    assert core.cut_line("short line", 20, count) == "short line"


def test_fields_and_the_digest_event() -> None:
    from service.core.events import Outcome

    start, end = utc(2026, 12, 4, 10), utc(2026, 12, 4, 10, 15)
    f = core.fields(["[a] x", "[b] y"], count=2, start=start, end=end, group=None)
    assert f == {
        "items": "[a] x\n[b] y",
        "count": "2",
        "window_start": "2026-12-04T10:00:00.000Z",
        "window_end": "2026-12-04T10:15:00.000Z",
        "group": "",
    }
    outcome = Outcome(
        id="d.1.all", handler="d", route="sync", model="m", received_at=end, completed_at=end, result="r"
    )
    event = core.digest_event(outcome, start=start, end=end, group="ops", member_ids=["a", "b"])
    assert event["handler"] == "d" and event["status"] == "ok"
    assert event["digest"] == {
        "window_start": "2026-12-04T10:00:00.000Z",
        "window_end": "2026-12-04T10:15:00.000Z",
        "group": "ops",
        "members": 2,
        "member_ids": ["a", "b"],
    }


GOOD = {"source": "summarize", "every": "1h", "handler": "gist"}
GIST = {"gist": {"prompt": "Digest of {count} ({window_start}-{window_end}, {group}):\n{items}"}}


def settings(tmp_path: Path, digests: dict[str, Any], **more: Any) -> Any:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    return load_settings(
        empty, state_dir=tmp_path, handlers={**GIST, **more.pop("handlers", {})}, digests=digests, **more
    )


def test_a_good_definition_is_typed(tmp_path: Path) -> None:
    s = settings(
        tmp_path,
        {"timezone": "Europe/Paris", "grace_s": 3, "w": {**GOOD, "group_by": "metadata.mailbox"}},
        pipelines={"triage": {"steps": ["extract"]}},
    )
    (spec,) = s.digest_specs.specs
    assert spec.name == "w" and spec.schedule == Every(3600) and spec.group_by == ("metadata", "mailbox")
    assert s.digest_specs.grace_s == 3.0 and s.digest_specs.timezone == "Europe/Paris"
    cron = settings(tmp_path, {"w": {"source": "summarize", "schedule": "0 18 * * FRI", "handler": "gist"}})
    assert isinstance(cron.digest_specs.specs[0].schedule, Cron)
    assert not settings(tmp_path, {}).digest_specs


@pytest.mark.parametrize(
    ("digests", "message"),
    [
        ({"w": {**GOOD, "every": None, "schedule": "0 18 * *"}}, "digests.w.schedule: bad cron '0 18 * *'"),
        ({"w": {**GOOD, "every": "fortnight"}}, "digests.w.every: bad duration 'fortnight'"),
        ({"w": {"source": "summarize", "handler": "gist"}}, "digests.w: set one of every or schedule"),
        ({"w": {**GOOD, "schedule": "* * * * *"}}, "digests.w: set one of every or schedule"),
        ({"w": {**GOOD, "source": "nope"}}, "digests.w.source: no handler or pipeline named 'nope'"),
        ({"w": {**GOOD, "handler": "nope"}}, "digests.w.handler: no handler named 'nope'"),
        ({"w": {**GOOD, "handler": "embed"}}, "digests.w.handler: 'embed' is an embedding handler"),
        ({"w": {**GOOD, "handler": "needs"}}, "digests.w.handler: 'needs' needs field(s) title"),
        ({"w": {**GOOD, "colour": "red"}}, "digests.w.colour: unknown key"),
        ({"w": {**GOOD, "group_by": "mailbox"}}, "digests.w.group_by: bad path 'mailbox'"),
        ({"w": {**GOOD, "context_tokens": 10}}, "digests.w.context_tokens: must be a whole number >= 256"),
        ({"summarize": GOOD}, "digests.summarize: the name is taken by a handler"),
        ({"triage": GOOD}, "digests.triage: the name is taken by a pipeline"),
        ({"bad name": GOOD}, "digests.bad name: a digest name is"),
        ({"timezone": "Mars/Olympus", "w": GOOD}, "digests.timezone: unknown time zone 'Mars/Olympus'"),
        ({"grace_s": -1, "w": GOOD}, "digests.grace_s: must be a number >= 0"),
        ({"colour": "red"}, "digests.colour: unknown setting"),
    ],
)
def test_bad_definitions_are_refused_naming_the_key(
    tmp_path: Path, digests: dict[str, Any], message: str
) -> None:
    digests = {
        k: ({kk: vv for kk, vv in v.items() if vv is not None} if isinstance(v, dict) else v)
        for k, v in digests.items()
    }
    with pytest.raises(ConfigError) as err:
        settings(
            tmp_path,
            digests,
            handlers={"needs": {"prompt": "{title}: {items}"}},
            pipelines={"triage": {"steps": ["extract"]}},
        )
    assert message in str(err.value)
