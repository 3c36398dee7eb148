"""Benchmarks of ``enrichd run`` as a real process: peak memory with 100,000 items
buffered (5) and the time from start to ready (7)."""

from __future__ import annotations

import asyncio
import json
import sys
import time
from datetime import UTC, datetime

from bench.harness import ROOT, Check, Env, item_1k, median, rss_mb, wait_count
from devkit.process import DaemonProcess

RSS_ITEMS = 100_000
STARTS = 3


# -- 5. peak RSS with 100,000 items buffered --------------------------------------------------


async def bench_rss(env: Env) -> list[Check]:
    prefix, n = "rrss", RSS_ITEMS
    hour = (datetime.now(UTC).hour + 12) % 24  # a flush window far from now: nothing flushes
    daemon = DaemonProcess(
        env.process_env(
            prefix,
            ENRICHD_BATCHING__MAX_ITEMS="50000",
            ENRICHD_BATCHING__MAX_WAIT_S="86400",
            ENRICHD_BATCHING__WINDOWS=json.dumps([f"* {hour} * * *"]),
        ),
        env.work / "rss.log",
    ).start(wait_ready=False)
    try:
        await daemon.ready()
        await asyncio.sleep(1.0)
        idle = rss_mb(daemon.proc.pid)
        js = env.js
        started = time.perf_counter()
        for i in range(n):
            await js.publish_async(f"{prefix}.in.tags", item_1k(i))
        await js.publish_async_completed()
        from service.contract.subjects import Subjects

        done = await wait_count(js, Subjects(prefix).stream("BUFFER"), n, timeout_s=300, poll_s=0.5)
        peak = rss_mb(daemon.proc.pid, "VmHWM")
        after = rss_mb(daemon.proc.pid)
    finally:
        await daemon.stop()
    return [
        Check(
            "rss",
            "peak RSS, 100,000 × 1 KB buffered",
            peak,
            "<=",
            300.0,
            unit="MB",
            measured=f"{peak:.0f} MB = idle {idle:.0f} MB + {peak - idle:.0f} MB ({peak / idle:.2f}× idle)",
            extra={
                "idle_mb": round(idle, 1),
                "peak_mb": round(peak, 1),
                "after_mb": round(after, 1),
                "peak_over_idle": round(peak / idle, 2),
                "intake_s": round(done - started, 1),
            },
        )
    ]


# -- 7. start-up time --------------------------------------------------------------------------


async def bare_python(code: str) -> float:
    started = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, cwd=ROOT)
    assert await proc.wait() == 0
    return time.perf_counter() - started


async def bench_startup(env: Env) -> list[Check]:
    ready_s, startup_s, bare_s, imports_s = [], [], [], []
    for attempt in range(STARTS):
        bare_s.append(await bare_python("import service"))
        imports_s.append(await bare_python("import service.app, service.cli"))
        daemon = DaemonProcess(env.process_env(f"rstart{attempt}"), env.work / f"start{attempt}.log").start(
            wait_ready=False
        )
        try:
            took, line = await daemon.ready()
        finally:
            await daemon.stop()
        ready_s.append(took)
        startup_s.append(float(str(line["startup_s"])))
    ready, bare = median(ready_s), median(bare_s)
    return [
        Check(
            "startup",
            "`enrichd run` to ready",
            ready,
            "<=",
            2.0,
            unit="s",
            measured=f"{ready:.2f} s = {ready / bare:.1f}× `python -c 'import service'` ({bare:.3f} s)",
            extra={
                "ready_s": [round(x, 3) for x in ready_s],
                "startup_s_logged": [round(x, 3) for x in startup_s],
                "bare_import_service_s": [round(x, 3) for x in bare_s],
                "import_service_app_s": [round(x, 3) for x in imports_s],
                "ratio_to_bare": round(ready / bare, 1),
            },
        )
    ]
