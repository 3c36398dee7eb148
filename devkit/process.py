"""Run ``enrichd run`` as a real process: for the crash, shutdown and outage tests, and for
the benchmarks of memory and start-up time (one copy, shared by tests/ and bench/)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


class DaemonProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()
        self.spawned_at = 0.0  # perf_counter() at spawn, and when the ready line was read
        self.ready_at = 0.0
        self.ready_line: dict[str, object] = {}

    def start(self, *, extra_env: dict[str, str] | None = None, wait_ready: bool = True) -> DaemonProcess:
        env = {**self.env, **(extra_env or {})}
        log = self.log_path.open("ab")
        self._ready.clear()
        self.spawned_at = time.perf_counter()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "service", "run"],
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        threading.Thread(target=self._pump, args=(self.proc, log), daemon=True).start()
        if wait_ready:
            self.wait_ready()
        return self

    def _pump(self, proc: subprocess.Popen[bytes], log: object) -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            log.write(line)  # type: ignore[attr-defined]
            log.flush()  # type: ignore[attr-defined]
            if b"enrichd ready" in line and not self._ready.is_set():
                self.ready_at = time.perf_counter()
                try:
                    self.ready_line = json.loads(line)
                except ValueError:  # the text log format
                    self.ready_line = {}
                self._ready.set()
        log.close()  # type: ignore[attr-defined]

    def wait_ready(self, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while not self._ready.wait(0.05):
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(f"daemon exited ({self.proc.returncode}):\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"daemon not ready:\n{self.log_tail()}")

    def wait_exit(self, timeout_s: float = 60.0) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"daemon still running:\n{self.log_tail()}") from None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def terminate(self, timeout_s: float = 30.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout_s)

    def log_tail(self, lines: int = 400) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    async def ready(self, timeout_s: float = 60.0) -> tuple[float, dict[str, object]]:
        """Wait for the "enrichd ready" line: seconds from spawn to that line, and the line."""
        await asyncio.to_thread(self.wait_ready, timeout_s)
        return self.ready_at - self.spawned_at, self.ready_line

    async def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it has not exited within ``timeout_s``."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.to_thread(self.proc.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
