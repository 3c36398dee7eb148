"""The shipped unit file passes `systemd-analyze verify` where systemd is installed."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "enrichd.service"


def test_unit_declares_notify_watchdog_and_hardening() -> None:
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "Restart=on-failure",
        "EnvironmentFile=",
        "StateDirectory=enrichd",
        "DynamicUser=yes",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "PrivateTmp=yes",
    ):
        assert line in text, line


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_verifies(tmp_path: Path) -> None:
    # The unit points at the install location (/opt/enrichd); verify checks that
    # ExecStart is executable, so point it at this checkout's entry point.
    entry = Path(sys.executable).parent / "enrichd"
    assert entry.exists(), entry
    unit = tmp_path / "enrichd.service"
    unit.write_text(UNIT.read_text().replace("/opt/enrichd/.venv/bin/enrichd", str(entry)))
    proc = subprocess.run(
        ["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "enrichd.service" not in proc.stderr, proc.stderr
