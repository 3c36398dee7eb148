"""Small asyncio helpers shared by the daemon's loops."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any

log = logging.getLogger("enrichd")


def reraise_if_cancelled() -> None:
    """Honour a cancellation that something below us swallowed: nats-py turns one inside
    ``publish_async`` into TooManyStalledMsgsError, and Python 3.11's ``wait_for`` can drop
    one. A loop that caught an exception calls this before going on."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def quietly(awaitable: Awaitable[Any]) -> None:
    """Await an ack/nak/in-progress: a failed one is redelivered by JetStream anyway."""
    try:
        await awaitable
    except Exception as exc:  # noqa: BLE001
        log.debug("ack/nak failed: %s", exc)
