"""Pure helpers of service/natsconn.py and the log setup (issue 10, points 1, 8, 10, 11)."""

from __future__ import annotations

import glob
import io
import json
import logging
import re
import shlex
from pathlib import Path

import pytest

from service.broker.connect import reconnect_delay
from service.core.redact import redact_url, url_secrets
from service.observability import logs
from service.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("nats://u:s3cret@h:4222", "nats://u:***@h:4222"),
        ("nats://tok3n-value@h:4222", "nats://***@h:4222"),
        ("nats://h:4222", "nats://h:4222"),
        ("u:p%40ss@h:4222", "u:***@h:4222"),
        ("nats://a:pw1@h1:4222, nats://a:pw2@h2:4222", "nats://a:***@h1:4222,nats://a:***@h2:4222"),
        ("tls://u:p:with:colons@h", "tls://u:***@h"),
    ],
)
def test_redact_url_hides_userinfo(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_url_secrets_and_settings_secrets_know_the_url_password(tmp_path: Path) -> None:
    assert set(url_secrets("nats://u:p%40ss-word@h:4222")) == {"p%40ss-word", "p@ss-word"}
    assert url_secrets("nats://just-a-token@h") == ["just-a-token"]
    assert url_secrets(None) == [] and url_secrets("nats://h:1") == []
    empty = tmp_path / "e.toml"
    empty.write_text("")
    settings = load_settings(empty, nats={"url": "nats://enrichd:hunter2-pw@10.0.0.5:4222"})
    assert "hunter2-pw" in settings.secrets()


def test_reconnect_backoff_doubles_up_to_a_cap() -> None:
    delays = [reconnect_delay(n) for n in range(10)]
    assert delays[:4] == [0.0, 0.25, 0.5, 1.0]
    assert max(delays) == 5.0 and delays == sorted(delays)
    assert 4.0 <= reconnect_delay(50, jitter=-1) <= reconnect_delay(50, jitter=1) <= 6.0


def test_faststream_lines_come_out_as_json() -> None:
    import faststream  # noqa: F401 - as in the daemon: imported (with its handlers) before configure

    stream = io.StringIO()
    logs.configure(level="INFO", fmt="json", secrets=["pw-12345"], stream=stream)
    try:
        logging.getLogger("faststream").warning("Connection broken with %r", "pw-12345")
        logging.getLogger("faststream.access.nats").warning("access line")
    finally:
        logging.getLogger().handlers.clear()
        logging.captureWarnings(False)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2, lines
    first = json.loads(lines[0])
    assert first["logger"] == "faststream" and "pw-12345" not in lines[0]


def test_readme_demo_commands_name_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"^\.venv/bin/enrichd submit (.+?)(?:\s+#.*)?$", readme, flags=re.M)
    assert commands, "no submit demo in the README"
    for command in commands:
        args = shlex.split(command)[1:]  # after the handler
        paths = [a for a in args if not a.startswith("-") and a not in ("urgent", "high", "normal", "low")]
        paths = [p for p in paths if not re.fullmatch(r"\d+", p)]
        for pattern in paths:
            assert glob.glob(str(ROOT / pattern)), f"README demo names {pattern}: no such file"
