"""Small asyncio helpers shared by the daemon's loops."""

from __future__ import annotations

import asyncio
import logging
import time
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


async def stage(name: str, awaitable: Awaitable[Any], timeout_s: float) -> None:
    """One shutdown stage: bounded by ``timeout_s``, logged, never raising (a stage that
    fails or hangs must not keep the next ones from running)."""
    started = time.monotonic()
    try:
        await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        log.warning(f"shutdown stage timed out: {name}", extra={"timeout_s": timeout_s})
        return
    except Exception:  # noqa: BLE001 - best effort during shutdown
        log.warning(f"shutdown stage failed: {name}", exc_info=True)
        return
    log.debug(name, extra={"took_s": round(time.monotonic() - started, 3)})
