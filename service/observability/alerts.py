"""Alerts on ``enrich.events.alert`` and in the log. The rules are pure
(:mod:`service.core.alerts`); this edge feeds them and publishes what they decide.

Every replica judges its own traffic. An alert's ``Nats-Msg-Id`` is its kind, key and
cooldown period, so replicas that fire the same alert in the same period publish it
once (within JetStream's duplicate window)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

from service.core.alerts import Alert, AlertRules, AlertState
from service.core.events import iso

log = logging.getLogger("enrichd.alerts")


class LifecycleSink(Protocol):
    async def lifecycle(self, topic: str, payload: dict[str, Any], *, msg_id: str | None = None) -> None: ...


class Alerter:
    def __init__(
        self,
        rules: AlertRules,
        sink: LifecycleSink,
        *,
        instance: str,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._state = AlertState(rules)
        self._sink = sink
        self._instance = instance
        self._monotonic = monotonic
        self._wall = wall
        self._tasks: set[asyncio.Task[None]] = set()
        self.published: int = 0

    def outcome(self, *, ok: bool) -> None:
        """One result event (ok or error) was published."""
        self._fire(self._state.outcome(self._monotonic(), ok=ok))

    def call(self, *, retry: bool) -> None:
        """One provider call is about to be made: a first attempt, or a retry."""
        self._fire(self._state.call(self._monotonic(), retry=retry))

    def batch_ages(self, batches: Iterable[tuple[str, float]]) -> None:
        """``batches``: (batch id, Unix creation time) of the batches in flight."""
        for alert in self._state.batch_ages(self._monotonic(), self._wall(), batches):
            self._fire(alert)

    async def drain(self, timeout_s: float = 5.0) -> None:
        if self._tasks:
            await asyncio.wait(set(self._tasks), timeout=timeout_s)

    def _fire(self, alert: Alert | None) -> None:
        if alert is None:
            return
        task = asyncio.get_running_loop().create_task(self._publish(alert), name=f"alert-{alert.kind}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, alert: Alert) -> None:
        now = self._wall()
        body = {
            "kind": alert.kind,
            "key": alert.key,
            "message": alert.message,
            "at": iso(datetime.fromtimestamp(now, UTC)),
            "instance": self._instance,
            **alert.details,
        }
        log.warning("alert: %s", alert.message, extra={"alert": alert.kind, "key": alert.key})
        period = int(now // max(1.0, self._state.rules.cooldown_s))
        try:
            await self._sink.lifecycle("alert", body, msg_id=f"alert:{alert.kind}:{alert.key}:{period}")
            self.published += 1
        except Exception:  # noqa: BLE001 - an alert that cannot be sent is logged above
            log.exception("could not publish an alert", extra={"alert": alert.kind})
