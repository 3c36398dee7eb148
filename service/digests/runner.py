"""The digest loop: per digest, wait for the window after its cursor to close, take the
window's lease (one replica runs it), read its members from the OUT stream, run the
handler on each group not yet done, publish one event per group, close the window.

Exactly once across replicas and crashes: the cursor and the lease are one KV record
changed by compare-and-set (state/digests.py); a group is marked done only after its
event's PubAck, and a re-run's event (after a crash between the two) is dropped by
JetStream as a duplicate of ``Nats-Msg-Id: <digest>:<window_start>:<group>``; the calls
already answered are read from the result store."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from handlers import HandlerSpec
from service.contract.subjects import Subjects
from service.core import digests as core
from service.core.digest_spec import DigestSettings, DigestSpec
from service.core.events import iso
from service.core.schedules import skip_to, window_at, window_from
from service.digests.lease import LeaseLostError, WindowLease
from service.digests.ports import Sink
from service.digests.publish import Publisher
from service.digests.reduce import Reducer, Window
from service.observability.telemetry import Metrics
from service.state.budget import BudgetExhaustedError
from service.state.digests import DigestBook, DigestRecord, Lease, read_window

log = logging.getLogger("enrichd.digests")
RETRY_S = 30.0  # a group that failed transiently is tried again this much later
ERROR_PAUSE_S = 5.0


def _at(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class Digests:
    """Every configured digest, one loop each (run together by :meth:`loop`)."""

    def __init__(
        self,
        settings: DigestSettings,
        *,
        read: Callable[[str, datetime, datetime], Any],
        book: DigestBook,
        reducer: Reducer,
        sink: Sink,
        subjects: Subjects,
        registry: Mapping[str, HandlerSpec],
        metrics: Metrics,
        clock: Callable[[], datetime],
        instance: str,
        context_tokens: int,
        budget_recheck_s: float = 60.0,
    ) -> None:
        self.settings = settings
        self._read = read  # (source, start, end) -> the events of the window
        self._book = book
        self._reducer = reducer
        self._sink = sink
        self._subjects = subjects
        self._registry = registry
        self._metrics = metrics
        self._clock = clock
        self._instance = instance
        self._context_tokens = context_tokens
        self._budget_recheck_s = budget_recheck_s
        self._publisher = Publisher(sink, subjects, metrics, clock=clock, instance=instance)
        # The window each digest waits for (or runs): for status and the gauges.
        self.open_windows: dict[str, tuple[datetime, datetime]] = {}
        # When this process holds a window of a digest idle (a retry, the budget): until when.
        self._retry_at: dict[str, float] = {}

    async def loop(self) -> None:
        """Run every digest until cancelled."""
        await asyncio.gather(*(self._digest_loop(spec) for spec in self.settings.specs))

    async def _digest_loop(self, spec: DigestSpec) -> None:
        while True:
            try:
                wait_s = await self.step(spec)
            except LeaseLostError as exc:
                log.warning(str(exc))
                wait_s = self.settings.check_s
            except Exception:  # noqa: BLE001 - NATS down, a bad record: this loop must outlive it
                log.warning("digest step failed; trying again", extra={"digest": spec.name}, exc_info=True)
                wait_s = ERROR_PAUSE_S
            await asyncio.sleep(wait_s)

    async def step(self, spec: DigestSpec) -> float:
        """Look at one digest once: start it, skip a too long backlog, or run the window
        after its cursor when it has closed. Returns how long to wait before the next look."""
        s = self.settings
        now = self._clock()
        got = await self._book.get(spec.name)
        if got is None:
            start, _ = window_at(spec.schedule, now)  # no history from before the digest existed
            if await self._book.create(spec.name, DigestRecord(cursor=start.timestamp())) is not None:
                log.info("digest started", extra={"digest": spec.name, "window_start": iso(start)})
            return 0.0
        record, revision = got
        if record.window is None:
            cursor = _at(record.cursor)
            skipped_to = skip_to(
                spec.schedule, cursor, now - timedelta(seconds=s.grace_s), keep=s.max_backlog
            )
            if skipped_to > cursor:
                return await self._skip(spec, record, revision, cursor, skipped_to)
            start, end = window_from(spec.schedule, cursor)
        else:
            start, end = _at(record.window.start), _at(record.window.end)
        self.open_windows[spec.name] = (start, end)
        closes_in = (end - now).total_seconds() + s.grace_s
        if closes_in > 0:
            return max(0.05, min(s.check_s, closes_in))
        held = record.window
        if held is not None and held.lease_until > now.timestamp():
            if held.owner != self._instance:
                return s.check_s  # another replica runs it
            retry_at = self._retry_at.get(spec.name, 0.0)
            if retry_at > now.timestamp():
                return min(s.check_s, retry_at - now.timestamp())  # ours, waiting for a retry
            # ours from before a crash or restart (same instance id): take it up now
        lease = Lease(
            start=start.timestamp(),
            end=end.timestamp(),
            owner=self._instance,
            lease_until=now.timestamp() + s.lease_s,
            done=held.done if held is not None else (),
            attempts=held.attempts if held is not None else {},
        )
        new_revision = await self._book.update(spec.name, record.with_window(lease), revision)
        if new_revision is None:
            return 0.0  # another replica moved first: look again
        run = WindowLease(
            self._book,
            spec.name,
            record.with_window(lease),
            new_revision,
            lease_s=s.lease_s,
            clock=self._clock,
        )
        beat = asyncio.create_task(run.heartbeat(), name=f"digest-lease-{spec.name}")
        try:
            await self._run(spec, run, start, end)
        finally:
            beat.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await beat
        return 0.0

    async def _skip(
        self, spec: DigestSpec, record: DigestRecord, revision: int, cursor: datetime, to: datetime
    ) -> float:
        if await self._book.update(spec.name, DigestRecord(cursor=to.timestamp()), revision) is None:
            return 0.0
        body = {
            "digest": spec.name,
            "from": iso(cursor),
            "to": iso(to),
            "max_backlog": self.settings.max_backlog,
            "instance": self._instance,
        }
        log.warning("digest backlog too long: older windows skipped", extra=body)
        await self._sink.lifecycle("digest.skipped", body, msg_id=f"{spec.name}:{iso(cursor)}:skipped")
        return 0.0

    async def _run(self, spec: DigestSpec, run: WindowLease, start: datetime, end: datetime) -> None:
        handler = self._registry[spec.handler]
        events = await self._read(spec.source, start, end)
        groups = core.split_groups(events, spec.group_by)
        done = set(run.window.done)
        errors = 0
        for group, members in groups.items():
            token = core.group_token(group)
            if token in done:
                continue
            window = Window(spec.name, start, end, group)
            try:
                reduced = await self._reducer.run(
                    handler,
                    window,
                    [m.line for m in members],
                    context_tokens=spec.context_tokens or self._context_tokens,
                )
            except BudgetExhaustedError as exc:
                log.warning("digest waits for budget", extra={"digest": spec.name, "error": str(exc)})
                await run.hold(self._budget_recheck_s)
                self._retry_at[spec.name] = self._clock().timestamp() + self._budget_recheck_s
                return
            if reduced.error is not None and reduced.error.retryable:
                failed = await run.failed(token, retry_in_s=RETRY_S)
                if failed < self.settings.max_attempts:
                    self._retry_at[spec.name] = self._clock().timestamp() + RETRY_S
                    log.warning(
                        "digest group failed; trying again later",
                        extra={"digest": spec.name, "group": group, "error_code": reduced.error.code},
                    )
                    return
            await self._publisher.publish(spec, handler, window, [m.id for m in members], reduced)
            errors += reduced.error is not None
            await run.mark_done(token)
        await run.close()
        total = sum(len(m) for m in groups.values())
        outcome = "empty" if not groups else ("error" if errors else "ok")
        self._metrics.digest_windows.add(1, {"digest": spec.name, "outcome": outcome})
        if groups:
            self._metrics.digest_members.add(total, {"digest": spec.name})
            body = {
                "digest": spec.name,
                "window_start": iso(start),
                "window_end": iso(end),
                "groups": len(groups),
                "members": total,
                "errors": errors,
                "instance": self._instance,
            }
            log.info("digest window closed", extra=body)
            await self._sink.lifecycle("digest.closed", body, msg_id=f"{spec.name}:{iso(start)}:closed")


def reader(js: Any, subjects: Subjects) -> Callable[[str, datetime, datetime], Any]:
    """The window reader over the OUT stream (state/digests.read_window)."""
    stream = subjects.stream("OUT")

    async def read(source: str, start: datetime, end: datetime) -> list[dict[str, Any]]:
        return await read_window(js, stream, subjects.out(source), start, end)

    return read
