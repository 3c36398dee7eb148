"""Shared rate limits under load (issue 5): THREE ``enrichd run`` processes on one NATS,
same subject prefix and consumer, all configured with the emulator's own limits, work
off a backlog of urgent items (sync path). The emulator enforces the limits and counts
what it admitted and what it refused with 429.

    .venv/bin/python -m bench.ratelimit [--warmup-s 10] [--window-s 60] [--replicas 3]

Two phases on one model, each a warm-up then a measurement window:

- ``rpm``: short items (~120 tokens per request incl. max output): requests per minute bind,
  tokens run at about a third of TPM;
- ``tpm``: long items (~1,000 tokens per request): tokens per minute bind, requests run
  at about a third of RPM.

Throughput is what the emulator admitted during the window, per minute, as a fraction
of the limit (tokens counted as the emulator counts them for TPM: prompt tokens plus the
requested maximum output). Figures go to ``bench/ratelimit.json``; exits 1 when the
binding limit is used below ``--min-fraction`` or 429s exceed ``--max-429-share``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-bench-0000000000000000"
MODEL = "gpt-4o-mini"
HANDLER = "tags"
PREFIX = "benchrl"
RPM = 600
TPM = 200_000
OUT = ROOT / "bench" / "ratelimit.json"
CHAT = "/v1/chat/completions"

WORDS = (
    "river harbour invoice meeting quarterly budget supplier engine garden ticket window "
    "station contract delivery museum forecast battery channel network service"
).split()


@dataclass(frozen=True)
class Phase:
    name: str
    binds: str  # "requests" or "tokens"
    words: int  # words of text per item

    def text(self, i: int) -> str:
        return " ".join(WORDS[(i + k) % len(WORDS)] for k in range(self.words))


PHASES = (Phase("rpm", "requests", 8), Phase("tpm", "tokens", 900))


@dataclass
class Sample:
    at: float
    ok: int
    refused: int  # 429 answers
    chat: int  # every chat request the emulator saw
    prompt_tokens: int

    @classmethod
    def take(cls, stats: dict[str, Any]) -> Sample:
        return cls(
            time.monotonic(),
            stats["chat_requests_ok"],
            stats["status_counts"].get(429, 0),
            stats["requests"].get(CHAT, 0),
            stats["tokens_in"],
        )


def replica_env(work: Path, url: str, base_url: str, index: int) -> dict[str, str]:
    limits = {MODEL: {"rpm": RPM, "tpm": TPM}}
    (work / "empty.toml").write_text("")
    return {
        **os.environ,
        "ENRICHD_CONFIG": str(work / "empty.toml"),
        "ENRICHD_STATE_DIR": str(work / f"state{index}"),
        "ENRICHD_INSTANCE_ID": f"replica{index}",
        "ENRICHD_NATS__URL": url,
        "ENRICHD_NATS__SUBJECT_PREFIX": PREFIX,
        "ENRICHD_OPENAI__BASE_URL": base_url,
        "ENRICHD_OPENAI__API_KEY": KEY,
        "ENRICHD_RATE_LIMITS": json.dumps(limits),
        "ENRICHD_TELEMETRY__METRICS_PORT": "0",
        "ENRICHD_FOLDERS__ENABLED": "false",
        "ENRICHD_SHUTDOWN__GRACE_S": "3",
    }


class Replicas:
    """``enrichd run`` processes sharing one NATS, prefix and consumer; logs in ``work``."""

    def __init__(self, work: Path, count: int, url: str, base_url: str) -> None:
        self.work = work
        self.envs = [replica_env(work, url, base_url, i) for i in range(count)]
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[IO[bytes]] = []

    def log_path(self, index: int) -> Path:
        return self.work / f"replica{index}.log"

    def spawn(self, index: int) -> None:
        self.logs.append(self.log_path(index).open("wb"))
        cmd = [sys.executable, "-m", "service", "run"]
        self.procs.append(subprocess.Popen(cmd, cwd=ROOT, env=self.envs[index], stderr=self.logs[-1]))

    async def start(self) -> None:
        self.spawn(0)
        await self.wait_ready(0)  # the first one creates the streams and the KV bucket
        for index in range(1, len(self.envs)):
            self.spawn(index)
        for index in range(len(self.envs)):
            await self.wait_ready(index)

    async def wait_ready(self, index: int, timeout_s: float = 60.0) -> None:
        proc, path = self.procs[index], self.log_path(index)
        deadline = time.monotonic() + timeout_s
        while b"enrichd ready" not in await asyncio.to_thread(path.read_bytes):
            if proc.poll() is not None:
                raise SystemExit(f"replica exited ({proc.returncode}); see {path}")
            if time.monotonic() > deadline:
                raise SystemExit(f"replica not ready after {timeout_s:.0f} s; see {path}")
            await asyncio.sleep(0.1)

    def stop(self, keep_logs: bool) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for log in self.logs:
            log.close()
        if keep_logs:
            for index in range(len(self.procs)):
                (ROOT / "bench" / f"ratelimit-replica{index}.log").write_bytes(
                    self.log_path(index).read_bytes()
                )


async def publish(js: Any, phase: Phase, count: int) -> None:
    for i in range(count):
        item = {"id": f"{phase.name}-{i:06d}", "text": phase.text(i), "priority": "urgent"}
        await js.publish_async(f"{PREFIX}.in.{HANDLER}", json.dumps(item).encode())
    await js.publish_async_completed()


def item_cost(phase: Phase) -> tuple[int, int]:
    """Prompt tokens and requested max output of one item: the emulator counts their sum
    against TPM (as OpenAI does)."""
    from handlers import build_registry
    from service.core.items import item_from_object
    from service.core.tokens import estimate_request_tokens

    spec = build_registry({}, chat_model=MODEL, embedding_model="text-embedding-3-small")[HANDLER]
    item = item_from_object({"id": "x", "text": phase.text(0)}, HANDLER)
    return estimate_request_tokens(spec.build_body(item)), spec.max_output_tokens or 0


def figures(phase: Phase, start: Sample, end: Sample, max_out: int) -> dict[str, Any]:
    minutes = (end.at - start.at) / 60
    ok = end.ok - start.ok
    tokens = (end.prompt_tokens - start.prompt_tokens) + ok * max_out
    chat = end.chat - start.chat
    refused = end.refused - start.refused
    rpm, tpm = ok / minutes, tokens / minutes
    return {
        "phase": phase.name,
        "binding_limit": phase.binds,
        "window_s": round(end.at - start.at, 1),
        "requests_per_min": round(rpm, 1),
        "tokens_per_min": round(tpm),
        "rpm_fraction": round(rpm / RPM, 3),
        "tpm_fraction": round(tpm / TPM, 3),
        "binding_fraction": round(rpm / RPM if phase.binds == "requests" else tpm / TPM, 3),
        "requests_seen": chat,
        "answered_429": refused,
        "share_429": round(refused / chat, 4) if chat else 0.0,
    }


async def served(emulator: Any, count: int, timeout_s: float = 120.0) -> None:
    """Wait until the emulator has answered ``count`` chat requests successfully."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if emulator.stats["chat_requests_ok"] >= count:
            return
        await asyncio.sleep(0.1)
    raise SystemExit(f"fewer than {count} requests served after {timeout_s:.0f} s")


async def run_phase(
    js: Any, emulator: Any, phase: Phase, args: argparse.Namespace, *, earlier: int
) -> dict[str, Any]:
    """Publish the phase's backlog, let the ``earlier`` items (previous phases) finish,
    warm up, then measure one window."""
    prompt, max_out = item_cost(phase)
    per_item = prompt + max_out
    per_min = min(RPM, TPM / per_item)
    # Enough for warm-up + window at the full limit, plus slack so the queue never runs dry.
    count = math.ceil(per_min * (args.warmup_s + args.window_s + 10) / 60)
    print(f"[{phase.name}] {count} items of {per_item} tokens; {phase.binds}/min should bind", flush=True)
    await publish(js, phase, count)
    await served(emulator, earlier)  # the previous phase's tail
    await asyncio.sleep(args.warmup_s)
    start = Sample.take(emulator.stats)
    ticks = max(1, round(args.window_s / 10))
    for tick in range(ticks):
        await asyncio.sleep(args.window_s / ticks)
        now = Sample.take(emulator.stats)
        print(
            f"[{phase.name}] {(tick + 1) * args.window_s / ticks:5.0f} s: ok {now.ok - start.ok:5d}  "
            f"429 {now.refused - start.refused:3d}",
            flush=True,
        )
    result = figures(phase, start, Sample.take(emulator.stats), max_out)
    result["tokens_per_request"] = per_item
    result["items_published"] = count
    return result


async def run(args: argparse.Namespace, work: Path) -> int:
    import nats

    from service.broker.embedded import EmbeddedNats
    from service.emulator import Emulator, EmulatorConfig, FaultConfig

    began = time.monotonic()
    embedded = EmbeddedNats(work / "nats", port=0)
    url = await embedded.start()
    emulator = Emulator(EmulatorConfig(api_key=KEY, batch_delay_s=0.5, seed=1))
    await emulator.start(host="127.0.0.1", port=0)
    emulator.set_faults(FaultConfig(rpm=RPM, tpm=TPM))
    replicas = Replicas(work, args.replicas, url, emulator.base_url)
    try:
        await replicas.start()
        print(f"{args.replicas} replicas ready after {time.monotonic() - began:.1f} s", flush=True)
        nc = await nats.connect(url)
        js = nc.jetstream(publish_async_max_pending=4000)
        first = Sample.take(emulator.stats)
        phases: list[dict[str, Any]] = []
        for phase in PHASES:
            earlier = sum(p["items_published"] for p in phases)
            phases.append(await run_phase(js, emulator, phase, args, earlier=earlier))
        last = Sample.take(emulator.stats)
        await nc.close()
    finally:
        replicas.stop(args.keep_logs)
        await emulator.stop()
        await embedded.stop()
    seen, refused = last.chat - first.chat, last.refused - first.refused
    report: dict[str, Any] = {
        "replicas": args.replicas,
        "emulator_limits": {"rpm": RPM, "tpm": TPM},
        "daemon_limits": {"rpm": RPM, "tpm": TPM},
        "warmup_s": args.warmup_s,
        "phases": phases,
        "whole_run": {
            "requests_seen": seen,
            "answered_429": refused,
            "share_429": round(refused / seen, 4) if seen else 0.0,
        },
        "duration_s": round(time.monotonic() - began, 1),
    }
    report["passed"] = all(p["binding_fraction"] >= args.min_fraction for p in phases) and all(
        p["share_429"] < args.max_429_share for p in [*phases, report["whole_run"]]
    )
    OUT.write_text(json.dumps(report, indent=2) + "\n")
    print_report(report)
    return 0 if report["passed"] else 1


def print_report(report: dict[str, Any]) -> None:
    for p in report["phases"]:
        print(
            f"{p['phase']}: {p['requests_per_min']:.0f} req/min ({p['rpm_fraction']:.1%} of RPM), "
            f"{p['tokens_per_min']} tok/min ({p['tpm_fraction']:.1%} of TPM); binding {p['binding_limit']} "
            f"at {p['binding_fraction']:.1%}; 429 {p['answered_429']}/{p['requests_seen']} "
            f"({p['share_429']:.2%}) over {p['window_s']:.0f} s"
        )
    whole = report["whole_run"]
    print(
        f"whole run: 429 {whole['answered_429']}/{whole['requests_seen']} ({whole['share_429']:.2%}); "
        f"took {report['duration_s']:.0f} s; {'PASS' if report['passed'] else 'FAIL'}; "
        f"wrote {OUT.relative_to(ROOT)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--replicas", type=int, default=3)
    parser.add_argument("--warmup-s", type=float, default=10.0)
    parser.add_argument("--window-s", type=float, default=60.0, help="measurement window per phase")
    parser.add_argument("--min-fraction", type=float, default=0.90)
    parser.add_argument("--max-429-share", type=float, default=0.01)
    parser.add_argument("--keep-logs", action="store_true", help="copy the replicas' logs into bench/")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="enrichd-bench-") as tmp:
        sys.exit(asyncio.run(run(args, Path(tmp))))


if __name__ == "__main__":
    main()
