"""The batch path's decisions with a fake clock and in-memory stand-ins, no sleeps:
budget cut and reservation (spend), create/requeue backoffs (submit, lifecycle), lease
adoption/renewal/expiry (lease) and held copies (held)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pytest

from handlers import build_registry
from service.batch.held import HeldCopies
from service.batch.lease import Leases, lease_step, may_advance
from service.batch.lifecycle import requeue_backoff_s
from service.batch.spend import Spend
from service.batch.submit import create_backoff_s, over_enqueued_tokens
from service.core.batch_outcomes import Fail, Ok, Retry
from service.core.cost import Price, Usage
from service.core.errors import ErrorInfo
from service.state.batches import BatchRecord
from service.state.budget import BudgetExhaustedError

REG = build_registry({}, chat_model="m", embedding_model="e")
PRICES = {"m": Price(1_000_000.0, 1_000_000.0)}  # 1 USD a token: easy sums


class FakeClock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def record(**changes: Any) -> BatchRecord:
    base: dict[str, Any] = {
        "flush_id": "f1-x",
        "endpoint": "/v1/chat/completions",
        "model": "m",
        "provider": "openai",
        "state": "submitted",
        "created_at": 0.0,
        "count": 2,
        "size_bytes": 10,
        "tokens": 10,
        "buffer_ranges": [[1, 2]],
        "owner": "me",
        "lease_until": 1_120.0,
    }
    return BatchRecord(**{**base, **changes})


# -- spend ---------------------------------------------------------------------------------


@dataclass
class FakeLedger:
    room: dict[str, float | None]
    reserved: list[tuple[str, float]] = field(default_factory=list)
    corrected: list[tuple[str, str, float]] = field(default_factory=list)

    async def remaining(self, handler: str) -> float | None:
        return self.room.get(handler)

    async def reserve(self, handler: str, route: str, usd: float) -> str:
        room = self.room.get(handler)
        if room is not None and usd > room:
            raise BudgetExhaustedError(handler, room, usd)
        self.reserved.append((handler, usd))
        return "2026-11-22"

    async def correct(self, day: str, handler: str, route: str, delta_usd: float) -> None:
        self.corrected.append((day, handler, round(delta_usd, 6)))


def spend(ledger: FakeLedger | None) -> Spend:
    return Spend(ledger=ledger, registry=REG, prices=PRICES, batch_discount=0.5)  # type: ignore[arg-type]


def items(*handlers: str) -> list[dict[str, Any]]:
    return [{"handler": h, "model": "m", "item": {"id": str(i)}} for i, h in enumerate(handlers)]


def test_ceiling_is_prompt_plus_max_output_at_the_batch_price() -> None:
    max_out = REG["tags"].max_output_tokens
    assert spend(None).ceiling_usd(items("tags")[0], 20) == pytest.approx((20 + max_out) * 0.5)


@pytest.mark.parametrize(
    ("room", "expected"),
    [
        ({"tags": None}, 3),  # no cap on the handler
        ({"tags": 1e9}, 3),
        ({"tags": 2 * (10 + 80) * 0.5 + 1}, 2),  # two ceilings fit, not three
        ({"tags": 1.0}, 0),
    ],
)
async def test_within_budget_cuts_the_flush(room: dict[str, float | None], expected: int) -> None:
    assert (
        await spend(FakeLedger(room)).within_budget(items("tags", "tags", "tags"), [10, 10, 10], 3)
        == expected
    )


async def test_no_ledger_no_cut_no_reservation() -> None:
    s = spend(None)
    assert await s.within_budget(items("tags"), [10], 1) == 1
    assert await s.reserve(items("tags"), [10]) == (None, 0.0)
    assert not s.owes(record(budget_day="2026-11-22"))


async def test_reserve_undoes_what_it_took_when_a_handler_is_over() -> None:
    ledger = FakeLedger({"tags": None, "summarize": 0.0})
    with pytest.raises(BudgetExhaustedError):
        await spend(ledger).reserve(items("tags", "summarize"), [10, 10])
    assert ledger.reserved == [("tags", 45.0)]
    assert ledger.corrected == [("2026-11-22", "tags", -45.0)]


async def test_settle_swaps_the_reservation_for_the_bill() -> None:
    ledger = FakeLedger({"tags": None})
    actions = [Ok({"tags": ["a"]}, Usage(10, 2)), Fail(ErrorInfo("x", "y", False), Usage(0, 0)), Retry("r")]
    rec = record(budget_day="2026-11-22", reserved_usd=90.0)
    await spend(ledger).settle(rec, items("tags", "tags", "tags"), actions)
    assert ledger.corrected == [("2026-11-22", "tags", 6.0 - 90.0)]  # billed 12 tokens at half price


# -- backoffs ------------------------------------------------------------------------------


@pytest.mark.parametrize(("attempts", "expected"), [(1, 2.0), (2, 4.0), (9, 512.0), (10, 512.0), (30, 512.0)])
def test_create_backoff(attempts: int, expected: float) -> None:
    assert create_backoff_s(attempts) == expected


@pytest.mark.parametrize(
    ("poll_s", "previous", "expected"),
    [(30.0, 1, 60.0), (30.0, 3, 240.0), (30.0, 8, 3600.0), (1.0, 20, 256.0)],
)
def test_requeue_backoff(poll_s: float, previous: int, expected: float) -> None:
    assert requeue_backoff_s(poll_s, previous) == expected


@pytest.mark.parametrize(
    ("queued", "tokens", "limit", "expected"),
    [
        (0, 500, 100, False),
        (50, 40, 100, False),
        (50, 60, 100, True),
        (50, 60, None, False),
        (50, 60, 0, False),
    ],
)
def test_over_enqueued_tokens(queued: int, tokens: int, limit: int | None, expected: bool) -> None:
    assert over_enqueued_tokens(queued, tokens, limit) is expected


# -- lease ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("owner", "lease_until", "now", "step", "may"),
    [
        ("me", 1_120.0, 1_000.0, None, True),  # ours, lease fresh
        ("me", 1_059.0, 1_000.0, "renew", True),  # less than half of 120 s left
        ("me", 900.0, 1_000.0, "renew", True),  # ours even when it ran out
        ("other", 1_120.0, 1_000.0, "adopt", False),  # the other replica's lease runs
        ("other", 1_000.0, 1_000.0, "adopt", True),  # ... and now it ran out
    ],
)
def test_lease_decisions(owner: str, lease_until: float, now: float, step: str | None, may: bool) -> None:
    rec = record(owner=owner, lease_until=lease_until)
    assert lease_step(rec, instance_id="me", now=now, lease_s=120.0) == step
    assert may_advance(rec, instance_id="me", now=now) is may


class FakeStore:
    def __init__(self) -> None:
        self.saved: list[tuple[str, float]] = []

    async def update(self, rec: BatchRecord) -> BatchRecord:
        self.saved.append((rec.owner, rec.lease_until))
        return rec


async def test_claim_adopts_renews_or_leaves_alone() -> None:
    clock, store = FakeClock(1_000.0), FakeStore()
    leases = Leases(store, instance_id="me", lease_s=120.0, clock=clock)  # type: ignore[arg-type]
    rec = await leases.claim(record(owner="other", lease_until=990.0))
    assert (rec.owner, rec.lease_until) == ("me", 1_120.0) and len(store.saved) == 1
    clock.now = 1_030.0  # 90 s left of 120: kept as is
    await leases.claim(rec)
    assert len(store.saved) == 1
    clock.now = 1_061.0  # 59 s left: renewed from now
    rec = await leases.claim(rec)
    assert store.saved[-1] == ("me", 1_181.0)


# -- held copies ---------------------------------------------------------------------------


@dataclass
class Seq:
    stream: int


@dataclass
class Meta:
    sequence: Seq


class FakeMsg:
    def __init__(self, seq: int, subject: str = "enrich.buffer.x") -> None:
        self.subject = subject
        self.metadata = Meta(Seq(seq))
        self.calls: list[str] = []

    async def in_progress(self) -> None:
        self.calls.append("in_progress")

    async def nak(self, delay: float | None = None) -> None:
        self.calls.append("nak")


async def test_held_copies_wait_for_their_flush_and_are_kept_alive() -> None:
    mono = FakeClock(0.0)
    held = HeldCopies(poll_interval_s=1.0, ack_wait_s=120.0, monotonic=mono)
    first = items("tags")[0]
    held.sent([first], "f1-x")
    copy = FakeMsg(5)
    await held.hold(("tags", "0"), copy, {**first, "body": {"big": "x"}})
    assert held and held.seqs == {"enrich.buffer.x": {5}}
    assert held.take_ready() == []  # the first copy is still in flight
    mono.now = 39.0
    await held.keep_alive()
    assert copy.calls == []
    mono.now = 40.0
    await held.keep_alive()
    await held.keep_alive()  # touched just now: not again
    assert copy.calls == ["in_progress"]
    held.published([first])
    ready = held.take_ready()
    assert [c.msg for c in ready] == [copy] and "body" not in ready[0].record
    assert not held and held.seqs == {"enrich.buffer.x": set()}
    held.put_back(ready)  # answering failed: held again
    assert held and held.seqs == {"enrich.buffer.x": {5}}
    await held.let_go()
    assert copy.calls[-1] == "nak" and not held


async def test_keep_flushes_forgets_items_of_flushes_done_elsewhere() -> None:
    held = HeldCopies(poll_interval_s=1.0, ack_wait_s=120.0, monotonic=FakeClock())
    held.sent(items("tags"), "f1-x")
    held.sent(items("summarize"), "f2-y")
    held.keep_flushes({"f2-y"})
    assert held.inflight == {("summarize", "0"): "f2-y"}
