"""systemd's notify protocol (``Type=notify``), stdlib only: one datagram of
``KEY=VALUE`` lines to ``$NOTIFY_SOCKET``. Silent no-op when not run by systemd."""

from __future__ import annotations

import asyncio
import os
import socket


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        address = env.get("NOTIFY_SOCKET", "")
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract socket
        self._address = address if address.startswith(("/", "\0")) else ""
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        watched = usec.isdigit() and (not pid or pid == str(os.getpid()))
        # Ping at half the interval systemd expects.
        self.watchdog_interval_s = int(usec) / 2e6 if watched else None

    @property
    def enabled(self) -> bool:
        return bool(self._address)

    def send(self, **fields: str | int) -> bool:
        if not self._address:
            return False
        payload = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            try:
                sock.sendto(payload, self._address)
            except OSError:
                return False
        return True

    def ready(self, status: str) -> None:
        self.send(ready=1, status=status, mainpid=os.getpid())

    def stopping(self, status: str = "draining") -> None:
        self.send(stopping=1, status=status)

    async def watchdog(self, healthy: object) -> None:
        """Ping ``WATCHDOG=1`` while ``healthy()`` is true; systemd restarts us otherwise."""
        if self.watchdog_interval_s is None:
            return
        while True:
            await asyncio.sleep(self.watchdog_interval_s)
            if callable(healthy) and healthy():
                self.send(watchdog=1)
