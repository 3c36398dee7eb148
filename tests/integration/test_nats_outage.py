"""NATS goes away under a real daemon process (issue 10, points 1 and 10): the daemon
reconnects for ever and says so, is not ready and stops the systemd watchdog while NATS
is unreachable, answers every item exactly once once NATS is back, writes only JSON lines
to stderr, and exits non-zero when the connection is closed for good."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import nats
import pytest

from devkit.nats import NatsServer, free_port
from devkit.process import DaemonProcess
from tests.conftest import events, read_stream
from tests.integration.test_crash import daemon_env


class NotifyListener:
    """The socket systemd would give the daemon (NOTIFY_SOCKET): every datagram line,
    with the time it arrived."""

    def __init__(self, path: Path) -> None:
        self.path = str(path)
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.lines: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            now = time.monotonic()
            self.lines.extend((now, line) for line in data.decode().splitlines())

    def pings(self, start: float, end: float) -> int:
        return sum(1 for t, line in self.lines if line == "WATCHDOG=1" and start <= t < end)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()


def readyz(port: int) -> int:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except OSError:
        return 0


async def wait_ready_status(port: int, want: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await asyncio.to_thread(readyz, port) == want:
            return True
        await asyncio.sleep(0.2)
    return False


def outage_env(tmp_path: Path, url: str, prefix: str, base_url: str, metrics_port: int) -> dict[str, str]:
    env = daemon_env(tmp_path, url, prefix, base_url)
    env.update(
        {
            "ENRICHD_TELEMETRY__METRICS_PORT": str(metrics_port),
            "ENRICHD_TELEMETRY__LOG_FORMAT": "json",
            "ENRICHD_TELEMETRY__LOG_LEVEL": "INFO",
            "ENRICHD_NATS__ACK_WAIT_S": "10",
            "WATCHDOG_USEC": "1000000",  # a ping every 0.5 s while healthy
        }
    )
    return env


def items(tag: str, count: int) -> list[dict[str, Any]]:
    """Half urgent (the sync route), half normal (a batch)."""
    return [
        {"id": f"{tag}{i:03d}", "text": f"outage item {tag} {i}", "priority": "urgent" if i % 2 else "normal"}
        for i in range(count)
    ]


def assert_json_lines(log_path: Path) -> list[dict[str, Any]]:
    lines = log_path.read_text(errors="replace").splitlines()
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"not a JSON log line: {line!r}") from None
    return parsed


async def test_short_outage_not_ready_no_watchdog_reconnects_and_logs_json(
    tmp_path: Path, prefix: str, emulator: Any
) -> None:
    server = NatsServer(tmp_path / "js").start()
    notify = NotifyListener(tmp_path / "notify.sock")
    metrics = free_port()
    env = outage_env(tmp_path, server.url, prefix, emulator.base_url, metrics)
    env["NOTIFY_SOCKET"] = notify.path
    daemon = DaemonProcess(env, tmp_path / "daemon.log").start()
    try:
        assert await wait_ready_status(metrics, 200, 10), daemon.log_tail()
        await asyncio.sleep(1.2)
        assert notify.pings(0, time.monotonic()) >= 2
        server.stop()
        stopped = time.monotonic()
        assert await wait_ready_status(metrics, 503, 5), "still ready with NATS down"
        await asyncio.sleep(4)
        assert await asyncio.to_thread(readyz, metrics) == 503
        assert notify.pings(stopped + 1.5, time.monotonic()) == 0, "watchdog pinged while NATS was down"
        server.start()
        restarted = time.monotonic()
        assert await wait_ready_status(metrics, 200, 20), daemon.log_tail()
        await asyncio.sleep(1.5)
        assert notify.pings(restarted, time.monotonic()) >= 1, "watchdog did not resume"
        nc = await nats.connect(server.url)
        try:
            reply = json.loads(
                (await nc.request(f"{prefix}.sync.tags", b'{"text": "after the outage"}', timeout=15)).data
            )
        finally:
            await nc.close()
        assert reply["status"] == "ok"
    finally:
        code = await asyncio.to_thread(daemon.terminate, 40)
        notify.close()
        server.stop()
    assert code == 0, daemon.log_tail()
    records = assert_json_lines(daemon.log_path)
    messages = [r["msg"] for r in records]
    assert "NATS disconnected, reconnecting" in messages
    assert "NATS reconnected" in messages


async def test_connection_closed_for_good_exits_non_zero(tmp_path: Path, prefix: str, emulator: Any) -> None:
    server = NatsServer(tmp_path / "js").start()
    env = outage_env(tmp_path, server.url, prefix, emulator.base_url, 0)
    daemon = DaemonProcess(env, tmp_path / "daemon.log").start()
    try:
        server.stop()
        # back, but refusing this client for good (it now needs credentials)
        server.start(user="someone", password="other-secret")
        code = await asyncio.to_thread(daemon.wait_exit, 30)
    finally:
        daemon.kill()
        server.stop()
    assert code not in (0, None), daemon.log_tail()
    assert "refused to reconnect" in daemon.log_path.read_text()


@pytest.mark.slow
@pytest.mark.timeout(420)
async def test_three_minute_outage_under_load_every_item_answered_once(
    tmp_path: Path, prefix: str, emulator: Any
) -> None:
    server = NatsServer(tmp_path / "js").start()
    notify = NotifyListener(tmp_path / "notify.sock")
    metrics = free_port()
    env = outage_env(tmp_path, server.url, prefix, emulator.base_url, metrics)
    env["NOTIFY_SOCKET"] = notify.path
    daemon = DaemonProcess(env, tmp_path / "daemon.log").start()
    before, after = items("a", 60), items("b", 20)
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        for item in before:  # under load: stopped while these are being worked on
            await js.publish(f"{prefix}.in.tags", json.dumps(item).encode())
        await nc.close()
        server.stop()
        stopped = time.monotonic()
        assert await wait_ready_status(metrics, 503, 5), "still ready with NATS down"
        statuses = []
        while time.monotonic() - stopped < 180:
            statuses.append(await asyncio.to_thread(readyz, metrics))
            await asyncio.sleep(2)
        assert set(statuses) == {503}, Counter(statuses)
        assert notify.pings(stopped + 1.5, time.monotonic()) == 0, "watchdog pinged while NATS was down"
        assert daemon.proc is not None and daemon.proc.poll() is None, daemon.log_tail()
        server.start()
        restarted = time.monotonic()
        assert await wait_ready_status(metrics, 200, 30), daemon.log_tail()
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        for item in after:
            await js.publish(f"{prefix}.in.tags", json.dumps(item).encode())
        total = len(before) + len(after)
        stream, subject = prefix.upper() + "_OUT", f"{prefix}.out.tags"
        await read_stream(js, stream, subject, total, timeout_s=90)
        out = events(await read_stream(js, stream, subject, total + 1, timeout_s=5))
        await nc.close()
        assert notify.pings(restarted, time.monotonic()) >= 1, "watchdog did not resume"
    finally:
        code = await asyncio.to_thread(daemon.terminate, 40)
        notify.close()
        server.stop()
    ids = Counter(e["id"] for e in out)
    assert set(ids) == {i["id"] for i in before + after}, sorted(set(ids) ^ {i["id"] for i in before + after})
    assert all(n == 1 for n in ids.values()), [k for k, n in ids.items() if n > 1]
    assert all(e["status"] == "ok" for e in out), [e for e in out if e["status"] != "ok"][:3]
    assert {e["route"] for e in out} == {"sync", "batch"}
    assert code == 0, daemon.log_tail()
    assert_json_lines(daemon.log_path)
