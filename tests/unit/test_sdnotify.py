"""The notify protocol against a real datagram socket."""

from __future__ import annotations

import os
import socket
from pathlib import Path

from service.observability.sdnotify import Notifier


def test_ready_stopping_and_watchdog_interval(tmp_path: Path) -> None:
    path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind(path)
        server.settimeout(2)
        n = Notifier({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
        assert n.enabled and n.watchdog_interval_s == 15.0
        n.ready("consuming enrich.in.>")
        assert server.recv(4096).decode().split("\n") == [
            "READY=1",
            "STATUS=consuming enrich.in.>",
            f"MAINPID={os.getpid()}",
        ]
        n.stopping()
        assert server.recv(4096) == b"STOPPING=1\nSTATUS=draining"
        assert n.send(watchdog=1)
        assert server.recv(4096) == b"WATCHDOG=1"


def test_abstract_socket_and_absent_socket() -> None:
    name = f"enrichd-test-{os.getpid()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as server:
        server.bind("\0" + name)
        server.settimeout(2)
        Notifier({"NOTIFY_SOCKET": "@" + name}).ready("ok")
        assert server.recv(4096).startswith(b"READY=1")
    quiet = Notifier({})
    assert not quiet.enabled and not quiet.send(ready=1) and quiet.watchdog_interval_s is None
    assert Notifier({"WATCHDOG_USEC": "1000000", "WATCHDOG_PID": "1"}).watchdog_interval_s is None
