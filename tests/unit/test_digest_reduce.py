"""The hierarchical reduction with a fake provider call and an in-memory result store:
one call when everything fits, chunks then their reduction when not, and a re-run
after a crash pays no finished call again."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from handlers import HandlerSpec
from service.core.cost import Usage
from service.core.errors import ErrorInfo
from service.core.events import Outcome
from service.core.items import Item
from service.digests.reduce import Reducer, Window
from service.state.results import StoredResult

T = datetime(2026, 12, 4, 10, tzinfo=UTC)
SPEC = HandlerSpec(
    name="review", model="gpt-4.1-nano", prompt="Review {count}:\n{items}", max_output_tokens=20
)
WINDOW = Window("d", T, T, None)


class FakeCaller:
    def __init__(self, fail_at: int | None = None) -> None:
        self.items: list[Item] = []
        self.fail_at = fail_at

    async def run(
        self,
        spec: HandlerSpec,
        item: Item,
        body: dict[str, Any],
        *,
        received_at: datetime,
        route: str = "sync",
    ) -> Outcome:
        self.items.append(item)
        error = ErrorInfo("server_error", "boom", True) if len(self.items) == self.fail_at else None
        return Outcome(
            id=item.id,
            handler=item.handler,
            route=route,
            model=spec.model,
            received_at=received_at,
            completed_at=received_at,
            result=None if error else f"summary of {item.fields['count']}",
            error=error,
            attempts=1,
            usage=Usage(10, 2),
            cost_usd=0.001,
            handler_version=spec.version,
        )


class FakeStore:
    def __init__(self) -> None:
        self.events: dict[tuple[str, str], dict[str, Any]] = {}

    async def get(self, handler: str, item_id: str, version: str | None = None) -> StoredResult | None:
        event = self.events.get((handler, item_id))
        if event is None or (version is not None and event["handler_version"] != version):
            return None
        return StoredResult(event, None)

    async def put(self, event: dict[str, Any], *, intake_seq: int | None) -> None:
        self.events[(event["handler"], event["id"])] = event


def lines(n: int) -> list[str]:
    return [
        f"[item-{i}] a result about invoices, travel plans and the quarterly meeting {i}" for i in range(n)
    ]


async def test_everything_fits_one_call() -> None:
    caller, store = FakeCaller(), FakeStore()
    reduced = await Reducer(caller=caller, store=store, clock=lambda: T).run(
        SPEC, WINDOW, lines(5), context_tokens=4000
    )
    assert reduced.error is None and reduced.calls == 1 and reduced.levels == 1
    assert reduced.result == "summary of 5" and reduced.usage == Usage(10, 2)
    assert (
        caller.items[0].text == caller.items[0].fields["items"]
        and caller.items[0].id == f"d.{int(T.timestamp())}.all.L0.C0"
    )


async def test_too_many_members_are_reduced_level_by_level() -> None:
    caller, store = FakeCaller(), FakeStore()
    reducer = Reducer(caller=caller, store=store, clock=lambda: T)
    reduced = await reducer.run(SPEC, WINDOW, lines(60), context_tokens=400)
    assert reduced.error is None and reduced.levels >= 2
    assert reduced.calls == len(caller.items) > 2
    chunk_calls = [i for i in caller.items if ".L0." in i.id]
    assert sum(int(i.fields["count"]) for i in chunk_calls) == 60  # every member in one chunk
    assert reduced.result == "summary of 60"  # the last call covers them all
    assert reduced.usage == Usage(10 * reduced.calls, 2 * reduced.calls)
    # a re-run (a crash after the calls): everything from the store, nothing paid again
    again = FakeCaller()
    rerun = await Reducer(caller=again, store=store, clock=lambda: T).run(
        SPEC, WINDOW, lines(60), context_tokens=400
    )
    assert again.items == [] and rerun.cached_calls == rerun.calls == reduced.calls
    assert rerun.result == reduced.result and rerun.usage == reduced.usage


async def test_a_failed_call_stops_and_the_finished_ones_are_kept() -> None:
    caller, store = FakeCaller(fail_at=2), FakeStore()
    reduced = await Reducer(caller=caller, store=store, clock=lambda: T).run(
        SPEC, WINDOW, lines(60), context_tokens=400
    )
    assert reduced.error is not None and reduced.error.code == "server_error" and reduced.calls == 2
    assert len(store.events) == 1  # the first chunk's answer is kept for the retry
    retry = FakeCaller()
    done = await Reducer(caller=retry, store=store, clock=lambda: T).run(
        SPEC, WINDOW, lines(60), context_tokens=400
    )
    assert done.error is None and done.cached_calls == 1 and retry.items[0].id.endswith(".L0.C1")


async def test_no_room_for_items_is_a_permanent_error() -> None:
    spec = HandlerSpec(name="review", model="m", prompt="{items}", max_output_tokens=400)
    reduced = await Reducer(caller=FakeCaller(), store=FakeStore(), clock=lambda: T).run(
        spec, WINDOW, lines(3), context_tokens=300
    )
    assert reduced.error is not None and reduced.error.code == "digest_context_too_small"
    assert not reduced.error.retryable and reduced.calls == 0
