"""A real nats-server (JetStream, loopback, its own store) for the tests and the benchmarks:
the session server of the test suite, and servers a test stops and starts again (a NATS
outage), optionally requiring a user and password."""

from __future__ import annotations

import socket
import subprocess
import time
from pathlib import Path
from typing import Any

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from service.broker.embedded import find_binary


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def closed_port() -> int:
    """A port nothing listens on (bound and released at once)."""
    return free_port()


class NatsServer:
    def __init__(self, store: Path, port: int | None = None) -> None:
        self.store = store
        self.port = port or free_port()
        self.url = f"nats://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, *, user: str | None = None, password: str | None = None) -> NatsServer:
        args = [str(find_binary()), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd", str(self.store)]
        if user is not None:
            args += ["--user", user, "--pass", password or ""]
        deadline = time.monotonic() + 15
        while True:  # the previous server may still hold the port for a moment
            self.proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            while time.monotonic() < deadline and self.proc.poll() is None:
                with socket.socket() as s:
                    if s.connect_ex(("127.0.0.1", self.port)) == 0:
                        time.sleep(0.1)
                        return self
                time.sleep(0.05)
            assert time.monotonic() < deadline, "nats-server did not start"
            time.sleep(0.2)

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


async def read_all(js: Any, stream: str, subject: str) -> list[Any]:
    """Every message on ``subject`` now in ``stream`` (an ephemeral consumer, no acks)."""
    sub = await js.pull_subscribe(
        subject,
        stream=stream,
        config=ConsumerConfig(
            deliver_policy=DeliverPolicy.ALL, ack_policy=AckPolicy.NONE, inactive_threshold=30
        ),
    )
    out: list[Any] = []
    try:
        pending = (await sub.consumer_info()).num_pending
        while len(out) < pending:
            try:
                out.extend(await sub.fetch(min(500, pending - len(out)), timeout=2.0))
            except (TimeoutError, nats.errors.TimeoutError):
                break
    finally:
        await sub.unsubscribe()
    return out
