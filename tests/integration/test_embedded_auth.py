"""The embedded nats-server is not open to every local user (issue 10, point 9): it
requires credentials the daemon generates once into its state dir (0600, in a 0700 dir),
an unauthenticated client is refused, and the command line uses the credentials."""

from __future__ import annotations

import asyncio
import json
import os
import stat
from pathlib import Path
from typing import Any

import nats
import pytest

from devkit.nats import free_port
from devkit.process import DaemonProcess
from tests.conftest import FIXTURES
from tests.integration.test_crash import daemon_env
from tests.integration.test_operations import enrichd


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


async def test_embedded_nats_requires_the_generated_credentials(
    tmp_path: Path, prefix: str, emulator: Any
) -> None:
    port = free_port()
    state = tmp_path / "state"
    env = daemon_env(tmp_path, "", prefix, emulator.base_url)
    del env["ENRICHD_NATS__URL"]
    env.update({"ENRICHD_NATS__EMBEDDED_PORT": str(port), "ENRICHD_TELEMETRY__LOG_LEVEL": "INFO"})
    cli = {k: v for k, v in os.environ.items() if not k.startswith(("ENRICHD_", "OPENAI_"))}
    cli.update({k: v for k, v in env.items() if k.startswith("ENRICHD_")})
    daemon = DaemonProcess(env, tmp_path / "daemon.log").start()
    try:
        assert mode(state) == 0o700
        auth_file = state / "nats-auth.json"
        assert mode(auth_file) == 0o600
        first = auth_file.read_text()
        password = json.loads(first)["password"]
        assert password not in daemon.log_path.read_text()
        with pytest.raises(Exception, match="(?i)authorization"):
            await nats.connect(
                f"nats://127.0.0.1:{port}", allow_reconnect=False, max_reconnect_attempts=1, connect_timeout=2
            )
        status = await enrichd("status", "--json", env=cli)
        assert status.returncode == 0, status.stderr
        assert "intake" in json.loads(status.stdout)
        note = FIXTURES / "nasty" / "README.md"
        done = await enrichd("submit", "tags", str(note), "--priority", "urgent", "--wait", env=cli)
        assert done.returncode == 0, done.stdout + done.stderr
        assert json.loads(done.stdout.splitlines()[-1])["status"] == "ok"
        await asyncio.to_thread(daemon.terminate, 30)
        daemon.start()  # the same credentials again
        assert auth_file.read_text() == first
        again = await enrichd("batches", "list", env=cli)
        assert again.returncode == 0, again.stderr
    finally:
        code = await asyncio.to_thread(daemon.terminate, 30)
    assert code == 0, daemon.log_tail()
