"""The digests' must-show (CONTRACT §15): THREE ``enrichd run`` replicas on one NATS, a
digest every 30 s over 500 urgent results in three mailboxes (one digest per window and
group), one replica SIGKILLed mid-window (and restarted), then all three SIGKILLed
mid-window for longer than a window (so a window closes while no daemon runs) and
restarted. Checks every member is in exactly one digest event, of its own group, and
there is one event per window and group; prints the figures as JSON.

    .venv/bin/python -m bench.digests_crash [--items 500] [--every 30s]

About three minutes. Exits 1 when a check fails."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import nats

from devkit.nats import NatsServer, read_all
from devkit.process import DaemonProcess

KEY = "sk-bench-digests"
CONFIG = """
[handlers.review]
model = "gpt-4.1-nano"
prompt = "Review these {count} results ({window_start} to {window_end}):\\n{items}"
max_output_tokens = 80

[digests]
grace_s = 2
lease_s = 15

[digests.every30]
source = "tags"
every = "{every}"
group_by = "metadata.mailbox"
handler = "review"
"""
MAILBOXES = ("ops", "sales", "support")


async def publish(js: Any, prefix: str, ids: list[str], spread_s: float) -> None:
    for item_id in ids:
        body = {
            "id": item_id,
            "text": f"result {item_id}: invoices, travel and a meeting",
            "priority": "urgent",
            "metadata": {"mailbox": MAILBOXES[int(item_id[1:]) % len(MAILBOXES)]},
        }
        await js.publish(f"{prefix}.in.tags", json.dumps(body).encode())
        await asyncio.sleep(spread_s / max(1, len(ids)))


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.digests_crash")
    parser.add_argument("--items", type=int, default=500)
    parser.add_argument("--every", default="30s")
    args = parser.parse_args(argv)
    from service.core.schedules import parse_every
    from service.emulator import Emulator, EmulatorConfig

    window_s = parse_every(args.every)
    tmp = Path(tempfile.mkdtemp(prefix="enrichd-digests-"))
    server = NatsServer(tmp / "nats").start()
    emulator = Emulator(EmulatorConfig(api_key=KEY, seed=1))
    base_url = await emulator.start(host="127.0.0.1", port=0)
    prefix = "mustshow"
    (tmp / "enrichd.toml").write_text(CONFIG.replace("{every}", args.every))
    replicas = []
    for n in range(3):
        env = {
            "ENRICHD_CONFIG": str(tmp / "enrichd.toml"),
            "ENRICHD_STATE_DIR": str(tmp / f"state{n}"),
            "ENRICHD_INSTANCE_ID": f"replica{n}",
            "ENRICHD_NATS__URL": server.url,
            "ENRICHD_NATS__SUBJECT_PREFIX": prefix,
            "ENRICHD_OPENAI__BASE_URL": base_url,
            "ENRICHD_OPENAI__API_KEY": KEY,
            "ENRICHD_TELEMETRY__METRICS_PORT": "0",
            "ENRICHD_FOLDERS__ENABLED": "false",
        }
        replicas.append(DaemonProcess(env, tmp / f"replica{n}.log"))
    started = time.monotonic()
    kills: list[dict[str, Any]] = []
    nc = await nats.connect(server.url)
    try:
        for r in replicas:
            r.start()
        js = nc.jetstream()
        ids = [f"m{i:04d}" for i in range(args.items)]
        fifth = len(ids) // 5
        await publish(js, prefix, ids[:fifth], window_s * 0.8)
        # mid-window: one replica SIGKILLed, restarted a little later
        replicas[0].kill()
        kills.append({"replicas": [0], "at": datetime.now(UTC).isoformat()})
        await publish(js, prefix, ids[fifth : 2 * fifth], window_s * 0.5)
        replicas[0].start()
        await publish(js, prefix, ids[2 * fifth : 4 * fifth], window_s * 0.8)
        # mid-window: every replica SIGKILLed, down longer than a window
        for r in replicas:
            r.kill()
        down_at = datetime.now(UTC)
        await asyncio.sleep(window_s + 5)
        up_at = datetime.now(UTC)
        kills.append({"replicas": [0, 1, 2], "at": down_at.isoformat(), "restarted": up_at.isoformat()})
        for r in replicas:
            r.start()
        await publish(js, prefix, ids[4 * fifth :], window_s * 0.5)
        deadline = time.monotonic() + 4 * window_s + 60
        events: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            events = [
                json.loads(m.data)
                for m in await read_all(js, f"{prefix.upper()}_OUT", f"{prefix}.out.every30")
            ]
            if sum(e["digest"]["members"] for e in events) >= len(ids):
                break
            await asyncio.sleep(1.0)
        await asyncio.sleep(window_s + 5)  # one more window: nothing more may come
        events = [
            json.loads(m.data) for m in await read_all(js, f"{prefix.upper()}_OUT", f"{prefix}.out.every30")
        ]
        results = [
            json.loads(m.data) for m in await read_all(js, f"{prefix.upper()}_OUT", f"{prefix}.out.tags")
        ]
    finally:
        await nc.close()
        codes = [r.terminate() if r.proc and r.proc.poll() is None else None for r in replicas]
        await emulator.stop()
        server.stop()
    seen = Counter(i for e in events for i in e["digest"]["member_ids"])
    windows = Counter((e["digest"]["window_start"], e["digest"]["group"]) for e in events)
    wrong_group = sum(
        1
        for e in events
        for i in e["digest"]["member_ids"]
        if MAILBOXES[int(i[1:]) % len(MAILBOXES)] != e["digest"]["group"]
    )
    closed_while_down = [
        e["digest"]["window_start"]
        for e in events
        if down_at < datetime.fromisoformat(e["digest"]["window_end"].replace("Z", "+00:00")) < up_at
    ]
    figures = {
        "items": len(ids),
        "every": args.every,
        "replicas": 3,
        "kills": kills,
        "source_result_events": len(results),
        "source_ids_answered": len({r["id"] for r in results if r["status"] == "ok"}),
        "digest_events": len(events),
        "windows": len({w for w, _ in windows}),
        "window_groups": len(windows),
        "members_in_the_wrong_group": wrong_group,
        "members_total": sum(e["digest"]["members"] for e in events),
        "distinct_members": len(seen),
        "members_in_two_digests": sum(1 for v in seen.values() if v > 1),
        "members_missing": len(set(ids) - set(seen)),
        "window_groups_with_two_events": sum(1 for v in windows.values() if v > 1),
        "windows_closed_while_all_down": closed_while_down,
        "digest_calls_paid": emulator.stats["requests_by_model"].get("gpt-4.1-nano", 0),
        "per_window": [
            [e["digest"]["window_start"], e["digest"]["group"], e["digest"]["members"], e["attempts"]]
            for e in events
        ],
        "exit_codes": codes,
        "elapsed_s": round(time.monotonic() - started, 1),
    }
    print(json.dumps(figures, indent=2))
    ok = (
        figures["members_missing"] == 0
        and figures["members_in_two_digests"] == 0
        and figures["window_groups_with_two_events"] == 0
        and wrong_group == 0
        and bool(closed_while_down)
    )
    print("PASS" if ok else "FAIL", file=sys.stderr)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
