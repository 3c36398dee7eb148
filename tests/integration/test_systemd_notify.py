"""The real daemon process speaks sd_notify to the socket systemd would give it:
READY=1 once consuming, WATCHDOG=1 at half of WATCHDOG_USEC, STOPPING=1 on SIGTERM,
then exit 0 (Type=notify, WatchdogSec in systemd/enrichd.service)."""

from __future__ import annotations

import asyncio
import socket
import time
from pathlib import Path

from devkit.process import DaemonProcess
from tests.integration.test_crash import daemon_env


def receive(sock: socket.socket, until: str, timeout_s: float) -> list[str]:
    got: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        sock.settimeout(max(0.01, deadline - time.monotonic()))
        try:
            got.extend(sock.recv(4096).decode().splitlines())
        except TimeoutError:
            break
        if any(line.startswith(until) for line in got):
            break
    return got


async def test_ready_watchdog_and_stopping_reach_the_notify_socket(
    nats_url, prefix, emulator, tmp_path: Path
) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(path)
        env = daemon_env(tmp_path, nats_url, prefix, emulator.base_url)
        env.update({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "1000000"})  # ping every 0.5 s
        daemon = DaemonProcess(env, tmp_path / "daemon.log").start()
        try:
            ready = await asyncio.to_thread(receive, sock, "READY=1", 10)
            assert "READY=1" in ready, ready
            pings = await asyncio.to_thread(receive, sock, "never", 1.6)
            assert pings.count("WATCHDOG=1") >= 2, pings
        finally:
            code = await asyncio.to_thread(daemon.terminate, 30)
        stopping = await asyncio.to_thread(receive, sock, "STOPPING=1", 2)
        assert "STOPPING=1" in stopping, stopping
        assert code == 0, daemon.log_tail()
