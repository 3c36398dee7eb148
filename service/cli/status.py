"""``enrichd status``: what is waiting, what is in flight, what failed — read from the
durable state over NATS, so it works against any replica or none."""

from __future__ import annotations

import time
from datetime import UTC, datetime, timedelta
from typing import Any

from nats.js import JetStreamContext
from rich.console import Group
from rich.progress_bar import ProgressBar
from rich.table import Table

from service.cli.admin import connect
from service.cli.views import money
from service.contract.subjects import Subjects
from service.core.digests import split_groups
from service.core.estimates import ROUTES, ratio
from service.core.events import iso
from service.core.schedules import window_at, window_from
from service.settings import Settings
from service.state.batches import ACTIVE_STATES, BatchRecord, BatchStore
from service.state.digests import DigestBook, read_window
from service.state.folder_files import progress as folder_progress
from service.state.stats import per_hour, read_days


def batch_progress(record: BatchRecord, now: float) -> dict[str, Any]:
    """Done fraction and an ETA from the completion rate observed since submission."""
    counts = record.request_counts or {}
    total = int(counts.get("total") or record.count or 0)
    done = int(counts.get("completed") or 0) + int(counts.get("failed") or 0)
    elapsed = max(1e-6, now - record.created_at)
    eta_s = None
    if 0 < done < total:
        eta_s = round((total - done) / (done / elapsed), 1)
    return {
        "batch_id": record.batch_id,
        "flush_id": record.flush_id,
        "model": record.model,
        "state": record.state,
        "provider_status": record.provider_status,
        "total": total,
        "done": done,
        "progress": round(done / total, 4) if total else 0.0,
        "eta_s": eta_s,
        "age_s": round(elapsed, 1),
        "note": record.note,
    }


def _sum_leaves(routes: dict[str, Any], into: dict[str, float]) -> None:
    for leaf in routes.values():
        if isinstance(leaf, dict):
            for key in ("items", "input_tokens", "output_tokens", "estimated_output_tokens"):
                into[key] = into.get(key, 0) + int(leaf.get(key, 0))
            for key in ("billed_usd", "estimated_usd"):
                into[key] = into.get(key, 0.0) + float(leaf.get(key, 0.0))


def handler_rows(settings: Settings, tallies: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per configured handler (and per handler only today's stats know of):
    its current version, and today's paid ok results with the estimate against billed."""
    rows = []
    for name in sorted(set(settings.registry) | set(tallies)):
        spec = settings.registry.get(name)
        versions = tallies.get(name) or {}
        total: dict[str, float] = {}
        by_route: dict[str, int] = {}
        by_version: dict[str, int] = {}
        for version, routes in versions.items():
            if not isinstance(routes, dict):
                continue
            mine: dict[str, float] = {}
            _sum_leaves(routes, mine)
            by_version[version] = int(mine.get("items", 0))
            for route, leaf in routes.items():
                if isinstance(leaf, dict):
                    by_route[route] = by_route.get(route, 0) + int(leaf.get("items", 0))
            _sum_leaves(routes, total)
        items = int(total.get("items", 0))
        billed, estimated = total.get("billed_usd", 0.0), total.get("estimated_usd", 0.0)
        rows.append(
            {
                "handler": name,
                "model": None if spec is None else spec.model,
                "handler_version": None if spec is None else spec.version,
                "pack": None if spec is None else spec.pack,
                "today": {
                    "items": items,
                    "routes": by_route,
                    "versions": by_version,
                    "input_tokens": int(total.get("input_tokens", 0)),
                    "output_tokens": int(total.get("output_tokens", 0)),
                    "estimated_output_tokens": int(total.get("estimated_output_tokens", 0)),
                    "billed_usd": round(billed, 8),
                    "estimated_usd": round(estimated, 8),
                    "estimate_over_billed": ratio(estimated, billed),
                },
            }
        )
    return rows


def pipeline_rows(settings: Settings, tallies: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per configured pipeline (CONTRACT §14): its version, and today's items per
    step (ok / error / skipped) and finished items."""
    rows = []
    for name, spec in sorted(settings.pipeline_specs.items()):
        tally = tallies.get(name) or {}
        counts = tally.get("steps") or {}
        rows.append(
            {
                "pipeline": name,
                "version": spec.version,
                "steps": [
                    {
                        "handler": h,
                        **{k: int((counts.get(h) or {}).get(k, 0)) for k in ("ok", "error", "skipped")},
                    }
                    for h in spec.handlers
                ],
                "finished": {k: int((tally.get("finished") or {}).get(k, 0)) for k in ("ok", "error")},
            }
        )
    return rows


async def _buffers(js: JetStreamContext, subjects: Subjects) -> list[dict[str, Any]]:
    stream = subjects.stream("BUFFER")
    info = await js.stream_info(stream, subjects_filter=subjects.buffer_filter)
    out = []
    for subject, count in sorted((info.state.subjects or {}).items()):
        oldest_s = None
        try:
            first = await js.get_msg(stream, seq=info.state.first_seq or 1, next=True, subject=subject)
            if first.time is not None:
                oldest_s = round((datetime.now(UTC) - first.time).total_seconds(), 1)
        except Exception:  # noqa: BLE001 - flushed meanwhile
            oldest_s = None
        out.append({"buffer": subject.rsplit(".", 1)[-1], "items": count, "oldest_s": oldest_s})
    return out


async def collect(settings: Settings) -> dict[str, Any]:
    subjects = Subjects(settings.nats.subject_prefix)
    now = time.time()
    async with connect(settings) as nc:
        js = nc.jetstream()
        try:
            intake = await js.consumer_info(subjects.stream("IN"), settings.nats.consumer)
            waiting = {"pending": intake.num_pending, "in_flight": intake.num_ack_pending}
        except Exception:  # noqa: BLE001 - no daemon has run yet
            waiting = {"pending": None, "in_flight": None}
        store = await BatchStore.open(js, subjects.stream_suffix, replicas=settings.nats.stream_replicas)
        records = await store.all()
        active = [batch_progress(r, now) for r in records if r.state in ACTIVE_STATES]
        day = now - 86_400
        finished = [r for r in records if r.state == "published" and r.status_changed_at >= day]
        dlq = await js.stream_info(subjects.stream("DLQ"))
        out_stream = await js.stream_info(subjects.stream("OUT"))
        wall = datetime.now(UTC)
        today, yesterday = await read_days(js, subjects.stream_suffix, wall)
        spent = sum(today["cost_usd"].values())
        rows = handler_rows(settings, today.get("handlers", {}))
        billed = round(sum(r["today"]["billed_usd"] for r in rows), 8)
        estimated = round(sum(r["today"]["estimated_usd"] for r in rows), 8)
        return {
            "handlers": rows,
            "pipelines": pipeline_rows(settings, today.get("pipelines", {})),
            "today": {
                "cost_usd": {k: round(v, 6) for k, v in today["cost_usd"].items()},
                "results": today["results"],
                "items_per_hour": round(per_hour(today, yesterday, wall), 1),
                "estimate": {
                    "items": sum(r["today"]["items"] for r in rows),
                    "billed_usd": billed,
                    "estimated_usd": estimated,
                    "estimate_over_billed": ratio(estimated, billed),
                },
            },
            "budget": {
                "daily_usd": settings.budget.daily_usd,
                "spent_usd": round(spent, 6),
                "left_usd": None
                if settings.budget.daily_usd is None
                else round(settings.budget.daily_usd - spent, 6),
                "handlers": settings.budget.handlers,
            },
            "files": folder_progress(settings.state_dir.resolve() / "folders"),
            "intake": waiting,
            "buffers": await _buffers(js, subjects),
            "batches_in_flight": active,
            "batches_finished_24h": len(finished),
            "batch_items_24h": {
                k: sum(int(r.outcome.get(k, 0)) for r in finished) for k in ("ok", "error", "retried")
            },
            "dlq_depth": dlq.state.messages,
            "results_stored": out_stream.state.messages,
            "digests": await _digests(js, settings, subjects),
        }


async def _digests(js: JetStreamContext, settings: Settings, subjects: Subjects) -> list[dict[str, Any]]:
    """Each digest's open window (the one after its cursor): members so far (read from
    the OUT stream, as the window's close will), when it closes, who runs it."""
    specs = settings.digest_specs.specs
    if not specs:
        return []
    book = await DigestBook.open(js, subjects.stream_suffix, replicas=settings.nats.stream_replicas)
    now = datetime.now(UTC)
    rows = []
    for spec in specs:
        got = await book.get(spec.name)
        if got is None:
            start, end = window_at(spec.schedule, now)
            running = None
        elif got[0].window is not None:
            lease = got[0].window
            start, end = datetime.fromtimestamp(lease.start, UTC), datetime.fromtimestamp(lease.end, UTC)
            running = lease.owner
        else:
            start, end = window_from(spec.schedule, datetime.fromtimestamp(got[0].cursor, UTC))
            running = None
        events = await read_window(
            js, subjects.stream("OUT"), subjects.out(spec.source), start, min(end, now)
        )
        groups = split_groups(events, spec.group_by)
        rows.append(
            {
                "digest": spec.name,
                "source": spec.source,
                "handler": spec.handler,
                "schedule": spec.schedule_text,
                "window_start": iso(start),
                "closes_at": iso(end + timedelta(seconds=settings.digest_specs.grace_s)),
                "members_so_far": sum(len(m) for m in groups.values()),
                "groups_so_far": len(groups),
                "running_on": running,
            }
        )
    return rows


def _ratio(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _pipelines_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="pipelines (today: items per step, ok / error / skipped)")
    for column in ("pipeline", "version", "steps", "finished ok / error"):
        table.add_column(column, no_wrap=True)
    for p in rows:
        steps = " → ".join(f"{st['handler']} {st['ok']}/{st['error']}/{st['skipped']}" for st in p["steps"])
        table.add_row(p["pipeline"], p["version"], steps, f"{p['finished']['ok']} / {p['finished']['error']}")
    return table


def _digests_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="open digest windows")
    for column in (
        "digest",
        "source",
        "schedule",
        "since",
        "members so far",
        "groups",
        "closes at",
        "running on",
    ):
        table.add_column(column, no_wrap=True)
    for d in rows:
        table.add_row(
            d["digest"],
            d["source"],
            d["schedule"],
            d["window_start"],
            str(d["members_so_far"]),
            str(d["groups_so_far"]),
            d["closes_at"],
            d["running_on"] or "-",
        )
    return table


def render(status: dict[str, Any]) -> Group:
    summary = Table.grid(padding=(0, 2))
    intake = status["intake"]
    summary.add_row("intake waiting", str(intake["pending"]), "in flight", str(intake["in_flight"]))
    summary.add_row(
        "DLQ depth", str(status["dlq_depth"]), "result events kept", str(status["results_stored"])
    )
    day = status["batch_items_24h"]
    summary.add_row(
        "batches done (24 h)",
        str(status["batches_finished_24h"]),
        "items ok / error / retried",
        f"{day['ok']} / {day['error']} / {day['retried']}",
    )
    today = status["today"]
    cost = today["cost_usd"]
    budget = status["budget"]
    cap = "no cap" if budget["daily_usd"] is None else f"of ${budget['daily_usd']:,.2f} budget"
    routes = [r for r in ROUTES if r in cost or r != "flex"] + sorted(set(cost) - set(ROUTES))
    summary.add_row(
        "cost today",
        f"${budget['spent_usd']:,.4f} {cap}",
        " / ".join(routes),
        " / ".join(f"${cost.get(r, 0.0):,.4f}" for r in routes),
    )
    estimate = today["estimate"]
    summary.add_row(
        "estimate vs billed today",
        f"{money(estimate['estimated_usd'])} / {money(estimate['billed_usd'])}",
        "estimate / billed",
        _ratio(estimate["estimate_over_billed"]) + f" over {estimate['items']} paid ok results",
    )
    summary.add_row(
        "results today",
        f"{today['results'].get('ok', 0)} ok / {today['results'].get('error', 0)} error",
        "items per hour",
        f"{today['items_per_hour']:,.0f}",
    )
    buffers = Table(title="buffers")
    for column in ("buffer", "items", "oldest"):
        buffers.add_column(column, no_wrap=True)
    for b in status["buffers"]:
        buffers.add_row(
            b["buffer"], str(b["items"]), "-" if b["oldest_s"] is None else f"{b['oldest_s']:.0f}s"
        )
    batches = Table(title="batches in flight")
    for column in ("batch", "status", "progress", "done", "ETA", "age"):
        batches.add_column(column, no_wrap=True)
    for b in status["batches_in_flight"]:
        batches.add_row(
            b["batch_id"] or f"({b['flush_id']})",
            b["provider_status"] or b["state"],
            ProgressBar(total=max(1, b["total"]), completed=b["done"], width=24),
            f"{b['done']}/{b['total']}",
            "-" if b["eta_s"] is None else f"{b['eta_s']:.0f}s",
            f"{b['age_s']:.0f}s",
        )
    handlers = Table(title="handlers (today: paid ok results, estimate against billed)")
    for column in (
        "handler",
        "model",
        "version",
        "pack",
        "results",
        "out/item",
        "expected",
        "billed",
        "estimate",
        "ratio",
    ):
        handlers.add_column(column, no_wrap=True)
    for h in status["handlers"]:
        t = h["today"]
        n = t["items"]
        handlers.add_row(
            h["handler"],
            h["model"] or "-",
            (h["handler_version"] or "(not configured)")
            + (f" (+{len(t['versions']) - 1} older today)" if len(t["versions"]) > 1 else ""),
            "-" if h["pack"] is None else str(h["pack"]),
            str(n),
            f"{t['output_tokens'] / n:,.1f}" if n else "-",
            f"{t['estimated_output_tokens'] / n:,.1f}" if n else "-",
            money(t["billed_usd"]),
            money(t["estimated_usd"]),
            _ratio(t["estimate_over_billed"]),
        )
    parts: list[Any] = [summary, handlers]
    if status.get("pipelines"):
        parts.append(_pipelines_table(status["pipelines"]))
    parts += [buffers, batches]
    if status.get("digests"):
        parts.append(_digests_table(status["digests"]))
    if status["files"]:
        files = Table(title="watched-folder files")
        for column in ("file", "handler", "state", "progress", "done"):
            files.add_column(column, no_wrap=True)
        for f in status["files"]:
            files.add_row(
                f["file"],
                f["handler"],
                f["state"],
                ProgressBar(total=max(1, f["total"]), completed=f["done"], width=24),
                f"{f['done']}/{f['total']}",
            )
        parts.append(files)
    return Group(*parts)
