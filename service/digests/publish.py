"""A digest's event for one window and group (CONTRACT §15): the result event with its
``digest`` descriptor under ``Nats-Msg-Id: <digest>:<window_start>:<group>``; for a
failure also the DLQ entry (the descriptor, not the members' text) and ``digest.failed``."""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime
from typing import Any

from handlers import HandlerSpec
from service import failpoints
from service.contract.subjects import Subjects
from service.core import digests as core
from service.core.digest_spec import DigestSpec
from service.core.events import Outcome, dlq_entry, iso
from service.digests.ports import Sink
from service.digests.reduce import Reduced, Window
from service.observability.telemetry import Metrics

log = logging.getLogger("enrichd.digests")


class Publisher:
    def __init__(
        self,
        sink: Sink,
        subjects: Subjects,
        metrics: Metrics,
        *,
        clock: Callable[[], datetime],
        instance: str,
    ) -> None:
        self._sink = sink
        self._subjects = subjects
        self._metrics = metrics
        self._clock = clock
        self._instance = instance

    async def publish(
        self, spec: DigestSpec, handler: HandlerSpec, window: Window, member_ids: list[str], reduced: Reduced
    ) -> None:
        now = self._clock()
        outcome = Outcome(
            id=core.event_id(spec.name, window.start, window.group),
            handler=spec.name,
            route="sync",
            model=handler.model,
            received_at=window.end,
            completed_at=now,
            result=reduced.result,
            error=reduced.error,
            attempts=reduced.calls,
            cached=reduced.calls > 0 and reduced.cached_calls == reduced.calls,
            usage=reduced.usage,
            cost_usd=round(reduced.cost_usd, 10),
            handler_version=handler.version,
        )
        event = self.fit(
            core.digest_event(
                outcome, start=window.start, end=window.end, group=window.group, member_ids=member_ids
            )
        )
        msg_id = core.digest_msg_id(spec.name, window.start, window.group)
        attrs = {"digest": spec.name, "cached": "true" if outcome.cached else "false"}
        self._metrics.digest_calls.add(reduced.calls, attrs)
        if reduced.error is not None:
            entry = dlq_entry(
                id=outcome.id,
                handler=spec.name,
                item=None,
                raw=None,
                error=reduced.error,
                attempts=reduced.calls,
                subject=self._subjects.out(spec.source),
                failed_at=now,
                last_provider_message=reduced.last_message,
            )
            entry["digest"] = event["digest"]
            await self._sink.dlq(spec.name, self._sink.encode(entry), msg_id=f"{msg_id}:dlq")
            failed = {
                "digest": spec.name,
                "window_start": iso(window.start),
                "window_end": iso(window.end),
                "group": window.group,
                "members": len(member_ids),
                "error": reduced.error.to_dict(),
                "instance": self._instance,
            }
            log.warning("digest failed", extra=failed)
            await self._sink.lifecycle("digest.failed", failed, msg_id=f"{msg_id}:failed")
        await self._sink.result(event, msg_id=msg_id)
        failpoints.hit("digest_after_publish")  # published, the group not yet marked done
        self._metrics.outcome(event, (now - window.end).total_seconds())

    def fit(self, event: dict[str, Any]) -> dict[str, Any]:
        """The event within NATS's max payload: a window with very many members keeps its
        count, and ``member_ids`` is cut (``member_ids_truncated: true``)."""
        if len(self._sink.encode(event)) <= self._sink.max_bytes:
            return event
        digest = dict(event["digest"])
        ids = list(digest["member_ids"])
        while (
            ids
            and len(self._sink.encode({**event, "digest": {**digest, "member_ids": ids}}))
            > self._sink.max_bytes
        ):
            ids = ids[: len(ids) // 2]
        return {**event, "digest": {**digest, "member_ids": ids, "member_ids_truncated": True}}
