"""``enrichd submit``: read files into items, publish them to ``enrich.in.<handler>``,
and with ``--wait`` follow ``enrich.out.<handler>`` until every result is in."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from nats.errors import Error as NatsError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from service.broker.connect import NatsUnreachableError, cli_connect, cli_url, describe
from service.contract.subjects import Subjects
from service.core.entries import FileFormatError, LineError
from service.core.errors import BadItemError
from service.core.formats import file_items
from service.core.items import default_id
from service.core.redact import redact_url
from service.settings import Settings


class SubmitError(Exception):
    """Nothing was published: bad arguments or files, or NATS unreachable."""


def nats_url(settings: Settings) -> str:
    return cli_url(settings)


def load_items(handler: str, paths: list[Path], priority: str | None) -> list[dict[str, Any]]:
    items: list[dict[str, Any]] = []
    for path in paths:
        if not path.is_file():
            raise SubmitError(f"{path}: not a file")
        try:
            records = list(file_items(path.name, path.read_bytes()))
        except FileFormatError as exc:
            raise SubmitError(f"{path}: {exc}") from None
        for record in records:
            if isinstance(record, LineError):
                raise SubmitError(f"{path}: {record.message}")
            if priority is not None:
                record["priority"] = priority
            if "id" not in record and isinstance(record.get("text"), str):
                fields = record.get("fields") if isinstance(record.get("fields"), dict) else {}
                record["id"] = default_id(handler, record["text"], fields or {})
            items.append(record)
    if not items:
        raise SubmitError("no items in the given files")
    return items


async def run_submit(
    settings: Settings, handler: str, paths: list[Path], *, priority: str | None, wait: bool, timeout_s: float
) -> int:
    items = load_items(handler, paths, priority)
    try:
        nc = await cli_connect(settings)
    except NatsUnreachableError as exc:
        raise SubmitError(str(exc)) from None
    try:
        return await _publish(nc, Subjects(settings.nats.subject_prefix), handler, items, wait, timeout_s)
    except (NatsError, TimeoutError, OSError) as exc:
        raise SubmitError(f"NATS at {redact_url(cli_url(settings))} failed: {describe(exc)}") from None
    finally:
        await nc.close()


async def _publish(
    nc: Any, subjects: Subjects, handler: str, items: list[dict[str, Any]], wait: bool, timeout_s: float
) -> int:
    console = Console(stderr=True)
    js = nc.jetstream()
    wanted = {str(item["id"]) for item in items}
    results: dict[str, dict[str, Any]] = {}
    done = asyncio.Event()

    async def on_result(msg: Any) -> None:
        try:
            event = json.loads(msg.data)
        except ValueError:
            return
        if event.get("id") in wanted and event["id"] not in results:
            results[event["id"]] = event
            if len(results) == len(wanted):
                done.set()

    sub = await nc.subscribe(subjects.out(handler), cb=on_result) if wait else None
    for item in items:
        await js.publish(f"{subjects.intake_prefix}{handler}", json.dumps(item).encode())
    console.print(f"published {len(items)} item(s) to {subjects.intake_prefix}{handler}")
    if not wait:
        return 0
    await _follow(console, results, wanted, done, timeout_s)
    if sub is not None:
        await sub.unsubscribe()
    for item in items:
        event = results.get(str(item["id"]))
        if event is not None:
            sys.stdout.write(json.dumps(event, ensure_ascii=False) + "\n")
    missing = len(wanted) - len(results)
    if missing:
        console.print(f"[red]{missing} result(s) did not arrive within {timeout_s:.0f} s[/red]")
        return 1
    return 0 if all(e.get("status") == "ok" for e in results.values()) else 3


async def _follow(
    console: Console, results: dict[str, Any], wanted: set[str], done: asyncio.Event, timeout_s: float
) -> None:
    columns = (TextColumn("results"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task("results", total=len(wanted))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        while not done.is_set() and loop.time() < deadline:
            progress.update(task, completed=len(results))
            try:
                await asyncio.wait_for(done.wait(), timeout=0.2)
            except TimeoutError:
                pass
        progress.update(task, completed=len(results))


__all__ = ["BadItemError", "SubmitError", "load_items", "run_submit"]
