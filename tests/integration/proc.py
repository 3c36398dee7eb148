"""Run ``enrichd run`` as a real process, for crash and shutdown tests."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


class DaemonProcess:
    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = {**os.environ, **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._ready = threading.Event()

    def start(self, *, extra_env: dict[str, str] | None = None, wait_ready: bool = True) -> DaemonProcess:
        env = {**self.env, **(extra_env or {})}
        log = self.log_path.open("ab")
        self._ready.clear()
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
            if b"enrichd ready" in line:
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
