"""The operator is never left guessing (issue 10, points 8 and 11, CONTRACT §17): with no
NATS each command prints one line naming the URL without its password and exits non-zero
within a few seconds; ``enrichd run`` says so at once and stops on SIGTERM within 2 s; a
password inside ``nats.url`` never shows in a log line or in ``enrichd check``."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from devkit.nats import NatsServer, closed_port
from devkit.process import DaemonProcess
from tests.integration.test_crash import daemon_env
from tests.integration.test_operations import cli_env, enrichd

PASSWORD = "pw-Zq81-never-shown"


def wait_for_text(path: Path, needle: str, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    text = ""
    while needle not in text and time.monotonic() < deadline:
        time.sleep(0.1)
        text = path.read_text() if path.exists() else ""
    return text


COMMANDS = [
    ["status"],
    ["status", "--json"],
    ["batches", "list"],
    ["batches", "show", "b1"],
    ["batches", "cancel", "b1"],
    ["dlq", "list"],
    ["dlq", "replay"],
    ["submit", "tags", "README.md"],
    ["check"],
]


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: " ".join(a))
async def test_each_command_without_nats_prints_one_line_and_fails_fast(
    args: list[str], tmp_path: Path, prefix: str
) -> None:
    url = f"nats://enrichd:{PASSWORD}@127.0.0.1:{closed_port()}"
    env = cli_env(tmp_path, url, prefix)
    started = time.monotonic()
    done = await enrichd(*args, env=env, timeout_s=30)
    took = time.monotonic() - started
    assert done.returncode != 0, (done.stdout, done.stderr)
    assert took < 8, f"took {took:.1f} s"  # generous for a loaded machine: "a few seconds"
    assert PASSWORD not in done.stdout + done.stderr
    if args[0] == "check":  # its report is on stdout, one line per check
        nats_lines = [line for line in done.stdout.splitlines() if " nats:" in line]
        assert len(nats_lines) == 1 and nats_lines[0].startswith("FAIL"), done.stdout
        assert "Traceback" not in done.stdout + done.stderr
        line = nats_lines[0]
    else:
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        line = lines[0]
    assert "cannot reach NATS at nats://enrichd:***@127.0.0.1:" in line, line


async def test_run_with_unreachable_nats_says_so_at_once_and_stops_on_sigterm(
    tmp_path: Path, prefix: str, emulator: Any
) -> None:
    url = f"nats://enrichd:{PASSWORD}@127.0.0.1:{closed_port()}"
    env = daemon_env(tmp_path, url, prefix, emulator.base_url)
    env["ENRICHD_TELEMETRY__LOG_LEVEL"] = "INFO"
    daemon = DaemonProcess(env, tmp_path / "daemon.log").start(wait_ready=False)
    try:
        text = await asyncio.to_thread(wait_for_text, daemon.log_path, "cannot reach NATS", 10)
        assert "cannot reach NATS" in text, text
        assert "nats://enrichd:***@127.0.0.1:" in text and PASSWORD not in text
        await asyncio.sleep(2)  # it keeps trying
        assert daemon.proc is not None and daemon.proc.poll() is None
        daemon.proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        code = await asyncio.to_thread(daemon.wait_exit, 10)
        assert time.monotonic() - started < 2.5, daemon.log_tail()
        assert code == 0, daemon.log_tail()
    finally:
        daemon.kill()


async def test_password_in_url_is_not_in_the_ready_line_or_check(
    tmp_path: Path, prefix: str, emulator: Any
) -> None:
    server = NatsServer(tmp_path / "js").start(user="enrichd", password=PASSWORD)
    url = f"nats://enrichd:{PASSWORD}@127.0.0.1:{server.port}"
    env = daemon_env(tmp_path, url, prefix, emulator.base_url)
    env["ENRICHD_TELEMETRY__LOG_LEVEL"] = "INFO"
    daemon = DaemonProcess(env, tmp_path / "daemon.log").start()
    try:
        check = await enrichd("check", env=cli_env(tmp_path, url, prefix, emulator.base_url))
        status = await enrichd("status", "--json", env=cli_env(tmp_path, url, prefix, emulator.base_url))
    finally:
        code = await asyncio.to_thread(daemon.terminate, 30)
        server.stop()
    assert code == 0, daemon.log_tail()
    assert check.returncode == 0, check.stdout + check.stderr
    assert PASSWORD not in check.stdout + check.stderr, check.stdout
    assert "ok   nats: connected to nats://enrichd:***@127.0.0.1:" in check.stdout
    assert status.returncode == 0 and "intake" in json.loads(status.stdout)
    log = daemon.log_path.read_text()
    assert PASSWORD not in log
    ready = [json.loads(line) for line in log.splitlines() if '"enrichd ready"' in line]
    assert ready and ready[0]["nats"] == f"nats://enrichd:***@127.0.0.1:{server.port}"
