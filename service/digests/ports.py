"""What the digest flow needs from the rest of the daemon, as Protocols (the composition
root passes the real parts: the sync route's SyncCall, the result store, the event sink)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Protocol

from handlers import HandlerSpec
from service.core.events import Outcome
from service.core.items import Item
from service.state.results import StoredResult


class Caller(Protocol):
    """One item's provider call under retry, rate limits and budget (pipeline/sync_call.py);
    raises BudgetExhaustedError when today's budget is spent."""

    async def run(
        self,
        spec: HandlerSpec,
        item: Item,
        body: dict[str, Any],
        *,
        received_at: datetime,
        route: str = "sync",
    ) -> Outcome: ...


class Store(Protocol):
    """The result store: ``ok`` events by (handler, id), for one handler version."""

    async def get(self, handler: str, item_id: str, version: str | None = None) -> StoredResult | None: ...

    async def put(self, event: dict[str, Any], *, intake_seq: int | None) -> None: ...


class Sink(Protocol):
    """Where digest events, DLQ entries and lifecycle events are published."""

    @property
    def max_bytes(self) -> int: ...

    def encode(self, obj: Any) -> bytes: ...

    async def result(
        self, event: dict[str, Any], *, msg_id: str | None = None, intake_seq: int | None = None
    ) -> None: ...

    async def dlq(self, handler: str, payload: bytes, *, msg_id: str) -> None: ...

    async def lifecycle(self, topic: str, payload: dict[str, Any], *, msg_id: str | None = None) -> None: ...
