"""What every ratio benchmark needs: a real nats-server, the emulator in its own process
over HTTP, daemons built from the daemon's own settings and composition root, and the
record of one measured figure (:class:`Check`)."""

from __future__ import annotations

import asyncio
import json
import os
import statistics
import sys
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import nats
from nats.js import JetStreamContext

ROOT = Path(__file__).resolve().parents[1]
KEY = "sk-bench-5e1f0a9c3b7d4e2f8a6c1b0d"
WORDS = (
    "invoice meeting budget travel report review deadline project client design launch "
    "contract payment schedule agenda summary release planning feedback roadmap quarter"
).split()


@dataclass
class Check:
    """One verdict: a measured figure against its target. ``op`` is ``>=``, ``<=`` or
    ``within`` (``low`` ≤ value ≤ ``target``)."""

    bench: str
    metric: str
    value: float
    op: str
    target: float
    unit: str = "×"
    measured: str = ""  # the daemon's figure and the baseline's, in words
    extra: dict[str, Any] = field(default_factory=dict)
    low: float | None = None  # the lower bound of a ``within`` target

    @property
    def met(self) -> bool:
        if self.op == "within":
            return self.low is not None and self.low <= self.value <= self.target
        return self.value >= self.target if self.op == ">=" else self.value <= self.target

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "met": self.met}


def item_1k(i: int, *, priority: str = "normal", size: int = 1000) -> bytes:
    """A ~1 KB item (the JSON message, not just the text) with its own id and text."""
    words = [WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(size // 6)]
    text = f"Note {i}: " + " ".join(words)
    item = {"id": f"b{i:07d}", "text": "", "priority": priority}
    room = size - len(json.dumps(item))
    item["text"] = text[: max(16, room)]
    return json.dumps(item).encode()


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def rss_mb(pid: int, field_name: str = "VmRSS") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return 0.0


async def publish_all(js: JetStreamContext, subject: str, payloads: Iterable[bytes]) -> None:
    for payload in payloads:
        await js.publish_async(subject, payload)
    await js.publish_async_completed()


async def stream_count(js: JetStreamContext, stream: str) -> int:
    return int((await js.stream_info(stream)).state.messages)


async def wait_count(
    js: JetStreamContext, stream: str, count: int, timeout_s: float, poll_s: float = 0.05
) -> float:
    """Wait until ``stream`` holds ``count`` messages; returns the monotonic time it did."""
    deadline = time.monotonic() + timeout_s
    while True:
        have = await stream_count(js, stream)
        if have >= count:
            return time.perf_counter()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{stream}: {have} of {count} messages after {timeout_s} s")
        await asyncio.sleep(poll_s)


class Env:
    """One real nats-server and one emulator process, and the daemons started on them.

    ``async with Env(work) as env``; every benchmark gets a fresh one so no benchmark's
    data slows another down."""

    def __init__(self, work: Path, *, batch_delay_s: float = 0.5) -> None:
        self.work = work
        self.batch_delay_s = batch_delay_s
        self.nats_url = ""
        self.base_url = ""
        self._nats: Any = None
        self._emulator: asyncio.subprocess.Process | None = None
        self._daemons: list[Any] = []
        self.nc: nats.NATS | None = None

    async def __aenter__(self) -> Env:
        from service.broker.embedded import EmbeddedNats

        self.work.mkdir(parents=True, exist_ok=True)
        self._nats = EmbeddedNats(self.work / "nats", port=0)
        self.nats_url = await self._nats.start()
        self._emulator = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bench.emulator_proc",
            "--api-key",
            KEY,
            "--batch-delay-s",
            str(self.batch_delay_s),
            cwd=ROOT,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=(self.work / "emulator.log").open("wb"),
        )
        assert self._emulator.stdout is not None
        line = await asyncio.wait_for(self._emulator.stdout.readline(), 30)
        if not line.startswith(b"http"):
            raise RuntimeError(f"the emulator did not start: {(self.work / 'emulator.log').read_text()}")
        self.base_url = line.decode().strip()
        self.nc = await nats.connect(self.nats_url)
        return self

    async def __aexit__(self, *exc: object) -> None:
        for daemon in reversed(self._daemons):
            await daemon.stop()
        if self.nc is not None:
            await self.nc.close()
        if self._emulator is not None:
            assert self._emulator.stdin is not None
            self._emulator.stdin.close()  # it stops when its stdin closes
            try:
                await asyncio.wait_for(self._emulator.wait(), 10)
            except TimeoutError:
                self._emulator.kill()
                await self._emulator.wait()
        await self._nats.stop()

    @property
    def js(self) -> JetStreamContext:
        assert self.nc is not None
        return self.nc.jetstream(publish_async_max_pending=4000)

    def emulator_stats(self) -> dict[str, Any]:
        url = self.base_url.removesuffix("/v1") + "/_emulator/stats"
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our own loopback URL
            data: dict[str, Any] = json.loads(response.read())
        return data

    def settings(self, prefix: str, *, config: Path | None = None, **overrides: Any) -> Any:
        """The daemon's Settings (its own loader), as the tests build them: ``config`` a
        TOML file (an operator's configuration), then the benchmark's own sections over it."""
        from service.settings import load_settings

        empty = self.work / "empty.toml"
        empty.write_text("")
        sections: dict[str, Any] = {
            "state_dir": self.work / f"state-{prefix}",
            "nats": {"url": self.nats_url, "subject_prefix": prefix},
            "openai": {"base_url": self.base_url, "api_key": KEY, "timeout_s": 30},
            "telemetry": {"metrics_port": 0, "log_format": "text", "log_level": "WARNING"},
            "folders": {"enabled": False},
            "shutdown": {"grace_s": 5},
        }
        for key, value in overrides.items():
            if isinstance(value, dict) and isinstance(sections.get(key), dict):
                sections[key] = {**sections[key], **value}
            else:
                sections[key] = value
        return load_settings(config or empty, **sections)

    async def daemon(self, prefix: str, *, config: Path | None = None, **overrides: Any) -> Any:
        """A started in-process ``service.app.Daemon`` (stopped when the Env closes)."""
        from service.app import Daemon

        daemon = Daemon(self.settings(prefix, config=config, **overrides))
        self._daemons.append(daemon)
        await daemon.start()
        return daemon

    def process_env(self, prefix: str, **extra: str) -> dict[str, str]:
        """Environment for ``python -m service run`` as a real process on this Env."""
        (self.work / "empty.toml").write_text("")
        return {
            **os.environ,
            "ENRICHD_CONFIG": str(self.work / "empty.toml"),
            "ENRICHD_STATE_DIR": str(self.work / f"state-{prefix}"),
            "ENRICHD_NATS__URL": self.nats_url,
            "ENRICHD_NATS__SUBJECT_PREFIX": prefix,
            "ENRICHD_OPENAI__BASE_URL": self.base_url,
            "ENRICHD_OPENAI__API_KEY": KEY,
            "ENRICHD_TELEMETRY__METRICS_PORT": "0",
            "ENRICHD_FOLDERS__ENABLED": "false",
            **extra,
        }
