"""Peak memory of the daemon while a large JSONL dropped into the inbox is enriched
(watched folders, CONTRACT §7): a real nats-server, the emulator over HTTP, and
``enrichd run`` as a real process; the figure is the kernel's VmHWM of that process.

    .venv/bin/python -m bench.folder_rss [--lines 100000] [--max-items 10000] [--via nats]
                                         [--format json]

Prints the phases (read, accepted, done) and the peak RSS; exits 1 above --limit-mb.
``--via nats`` publishes the same items straight to intake instead (no folder source), to
tell the folder source's memory from the rest of the daemon's. ``--format json`` drops the
same items as one ``.json`` list (one element per line) instead of a ``.jsonl``;
``--text-bytes N`` pads each item's text to about N bytes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-bench-0000000000000000"


def rss_mb(pid: int, field: str) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


def spawn(env: dict[str, str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "service", "run"], cwd=ROOT, env=env, stderr=log)


def write_jsonl(path: Path, lines: int, fmt: str = "jsonl", text_bytes: int = 0) -> None:
    pad = " " + "lorem ipsum " * (text_bytes // 12) if text_bytes else ""
    with path.open("w") as f:
        f.write("[\n" if fmt == "json" else "")
        for i in range(lines):
            item = json.dumps({"id": f"r{i:07d}", "text": f"row {i}: a short note about topic {i % 97}{pad}"})
            f.write(item + ("\n" if fmt == "jsonl" else ",\n" if i < lines - 1 else "\n]\n"))


async def run(args: argparse.Namespace, work: Path) -> int:
    from service.broker.embedded import EmbeddedNats
    from service.emulator import Emulator, EmulatorConfig

    nats = EmbeddedNats(work / "nats", port=0)
    url = await nats.start()
    emulator = Emulator(EmulatorConfig(api_key=KEY, batch_delay_s=0.5, seed=1))
    await emulator.start(host="127.0.0.1", port=0)
    (work / "empty.toml").write_text("")
    env = {
        **os.environ,
        "ENRICHD_CONFIG": str(work / "empty.toml"),
        "ENRICHD_STATE_DIR": str(work / "state"),
        "ENRICHD_NATS__URL": url,
        "ENRICHD_OPENAI__BASE_URL": emulator.base_url,
        "ENRICHD_OPENAI__API_KEY": KEY,
        "ENRICHD_TELEMETRY__METRICS_PORT": "0",
        "ENRICHD_FOLDERS__INBOX": str(work / "inbox"),
        "ENRICHD_FOLDERS__OUTBOX": str(work / "outbox"),
        "ENRICHD_FOLDERS__SETTLE_S": "0.2",
        "ENRICHD_BATCHING__MAX_ITEMS": str(args.max_items),
        "ENRICHD_BATCHING__MAX_WAIT_S": "2",
        "ENRICHD_BATCHING__POLL_INTERVAL_S": "0.5",
    }
    log = (work / "daemon.log").open("wb")
    proc = spawn(env, log)
    name = f"big.{args.format}"
    source = work / name
    write_jsonl(source, args.lines, args.format, args.text_bytes)
    results = work / "outbox" / "tags" / f"{name}.results.jsonl"
    try:
        while b"watching folder" not in (work / "daemon.log").read_bytes():
            assert proc.poll() is None, "the daemon exited"
            await asyncio.sleep(0.1)
        idle = rss_mb(proc.pid, "VmRSS")
        started = time.monotonic()
        if args.via == "nats":
            await publish_directly(url, source)
        else:
            (work / "inbox" / "tags").mkdir(parents=True, exist_ok=True)
            os.replace(source, work / "inbox" / "tags" / name)
        marks: dict[str, float] = {}
        while not await finished(url, args, results):
            assert proc.poll() is None, "the daemon exited"
            text = (work / "daemon.log").read_bytes()
            for mark in ("file read", "file accepted"):
                if mark not in marks and f'"{mark}"'.encode() in text:
                    marks[mark] = time.monotonic() - started
                    print(
                        f"{mark:>14}: {marks[mark]:6.1f} s  RSS {rss_mb(proc.pid, 'VmRSS'):4.0f} MB"
                        f"  peak so far {rss_mb(proc.pid, 'VmHWM'):4.0f} MB",
                        flush=True,
                    )
            await asyncio.sleep(0.2)
        took = time.monotonic() - started
        peak = rss_mb(proc.pid, "VmHWM")
    finally:
        proc.terminate()
        proc.wait(30)
        log.close()
        await emulator.stop()
        await nats.stop()
    count = args.lines
    if args.via == "folder":
        with results.open() as f:
            count = sum(1 for line in f if json.loads(line)["status"] == "ok")
    print(f"{'done':>14}: {took:6.1f} s  {count} ok of {args.lines} (via {args.via})")
    print(f"peak RSS (VmHWM) {peak:.0f} MB, idle {idle:.0f} MB, limit {args.limit_mb} MB")
    return 0 if peak < args.limit_mb and count == args.lines else 1


async def publish_directly(url: str, source: Path) -> None:
    """The same items straight into intake, for comparison: what the daemon needs
    without the folder source."""
    import nats

    nc = await nats.connect(url)
    js = nc.jetstream(publish_async_max_pending=4000)
    with source.open("rb") as f:
        for line in f:
            await js.publish_async("enrich.in.tags", line.rstrip(b"\n"))
    await js.publish_async_completed()
    await nc.close()


async def finished(url: str, args: argparse.Namespace, results: Path) -> bool:
    if args.via == "folder":
        return await asyncio.to_thread(results.exists)
    import nats

    nc = await nats.connect(url)
    try:
        info = await nc.jetstream().stream_info("ENRICH_OUT")
    finally:
        await nc.close()
    return info.state.messages >= args.lines


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lines", type=int, default=100_000)
    parser.add_argument("--max-items", type=int, default=10_000, help="batching.max_items")
    parser.add_argument("--limit-mb", type=float, default=400.0)
    parser.add_argument("--via", choices=("folder", "nats"), default="folder", help="nats: no folder source")
    parser.add_argument("--format", choices=("jsonl", "json"), default="jsonl", help="json: one .json list")
    parser.add_argument("--text-bytes", type=int, default=0, help="pad each item's text to about this size")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="enrichd-bench-") as tmp:
        sys.exit(asyncio.run(run(args, Path(tmp))))


if __name__ == "__main__":
    main()
