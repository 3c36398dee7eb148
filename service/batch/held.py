"""Items in flight in this replica's flushes, and the buffered copies of them held back
meanwhile: unacked (kept alive with ``in_progress``), answered from the result store as
soon as the first copy's flush is published (service.batch.publisher), so the provider
is not paid twice."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from service.core.flush_plan import Key, keep_alive_due
from service.state.buffers import nak_quietly

log = logging.getLogger("enrichd.batch")

MAX_HELD = 20_000  # copies held back in memory at most; beyond, they wait in the buffer


@dataclass
class HeldCopy:
    """A buffered copy of an item in flight, held unacked until its answer is stored."""

    subject: str
    msg: Any
    record: dict[str, Any]
    touched: float  # monotonic time of the last delivery or in_progress


class HeldCopies:
    def __init__(
        self,
        *,
        poll_interval_s: float,
        ack_wait_s: float,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.poll_interval_s = poll_interval_s
        self.ack_wait_s = ack_wait_s
        self.monotonic = monotonic
        # (handler, item id) of the items in this replica's flushes not yet published.
        self.inflight: dict[Key, str] = {}
        self._held: dict[Key, list[HeldCopy]] = {}
        self.seqs: dict[str, set[int]] = {}  # held buffer sequences, by buffer subject

    def __bool__(self) -> bool:
        return bool(self._held)

    def sent(self, records: Iterable[dict[str, Any]], flush_id: str) -> None:
        for r in records:
            self.inflight[(r["handler"], r["item"]["id"])] = flush_id

    def published(self, items: Iterable[dict[str, Any]]) -> None:
        for item in items:
            self.inflight.pop((item["handler"], item["item"]["id"]), None)

    def keep_flushes(self, active: set[str]) -> None:
        """Forget the items of flushes no longer active (e.g. published by another replica)."""
        self.inflight = {k: f for k, f in self.inflight.items() if f in active}

    async def hold(self, key: Key, msg: Any, record: dict[str, Any]) -> None:
        """Hold a copy back until the first copy's answer is stored (:meth:`release_ready`)."""
        if sum(len(seqs) for seqs in self.seqs.values()) >= MAX_HELD:
            await msg.nak(delay=self.poll_interval_s)  # too many held: the buffer keeps the rest
            return
        record.pop("body", None)  # only the answer's metadata is needed
        self._held.setdefault(key, []).append(HeldCopy(msg.subject, msg, record, self.monotonic()))
        self.seqs.setdefault(msg.subject, set()).add(msg.metadata.sequence.stream)

    def take_ready(self) -> list[HeldCopy]:
        """The held copies whose first copy is no longer in flight in this replica,
        taken out to be answered (:meth:`put_back` if that fails)."""
        ready = [key for key in self._held if key not in self.inflight]
        copies = [copy for key in ready for copy in self._held.pop(key)]
        for copy in copies:
            self.seqs.get(copy.subject, set()).discard(copy.msg.metadata.sequence.stream)
        return copies

    def put_back(self, copies: list[HeldCopy]) -> None:
        for copy in copies:
            key = (copy.record["handler"], copy.record["item"]["id"])
            self._held.setdefault(key, []).append(copy)
            self.seqs.setdefault(copy.subject, set()).add(copy.msg.metadata.sequence.stream)

    async def keep_alive(self) -> None:
        """``in_progress`` for held copies, often enough that the buffer's ack wait never
        hands them to another fetch while the first copy's batch runs (hours at times)."""
        now = self.monotonic()
        for copies in list(self._held.values()):
            for copy in copies:
                if keep_alive_due(copy.touched, now, self.ack_wait_s):
                    await copy.msg.in_progress()
                    copy.touched = now

    async def let_go(self) -> None:
        """Every held copy back to the buffer now rather than after the ack wait."""
        held, self._held = self._held, {}
        self.seqs = {}
        for copies in held.values():
            for copy in copies:
                await nak_quietly(copy.msg)
