"""What the pipeline needs from the rest of the daemon, as Protocols: the composition
root (service/app.py) passes the real parts, tests pass fakes."""

from __future__ import annotations

from typing import Any, Protocol

from service.core.intake import BufferWrite
from service.providers.openai_sync import ProviderResponse
from service.state.results import StoredResult


class Store(Protocol):
    """The result store: ``ok`` events by (handler, id)."""

    async def get(self, handler: str, item_id: str, version: str | None = None) -> StoredResult | None: ...

    async def put(self, event: dict[str, Any], *, intake_seq: int | None) -> None: ...


class Limiter(Protocol):
    """The shared rate limit: reserve before a call, correct from its usage after."""

    async def acquire(self, model: str, *, tokens: int, urgent: bool) -> float: ...

    async def settle(self, model: str, *, estimated: int, actual: int) -> None: ...

    def observe(self, model: str, headers: dict[str, str]) -> None: ...


class Ledger(Protocol):
    """The daily budget: ``reserve`` (raises BudgetExhaustedError) returns the budget
    day the reservation counts in; ``correct`` adjusts it once the cost is known."""

    async def reserve(self, handler: str, route: str, usd: float) -> str: ...

    async def correct(self, day: str, handler: str, route: str, delta_usd: float) -> None: ...


class Alerts(Protocol):
    """The alert rules' inputs."""

    def call(self, *, retry: bool) -> None: ...

    def outcome(self, *, ok: bool) -> None: ...


class Provider(Protocol):
    """One synchronous provider call (classified errors: ProviderError)."""

    async def call(
        self, endpoint: str, body: dict[str, Any], *, timeout_s: float | None = None
    ) -> ProviderResponse: ...


class Sink(Protocol):
    """Where endings and buffer messages are published. ``encode`` is the payload
    encoding (scrubbed of secrets), ``max_bytes`` the largest payload NATS takes."""

    @property
    def max_bytes(self) -> int: ...

    def encode(self, obj: Any) -> bytes: ...

    async def result(
        self, event: dict[str, Any], *, msg_id: str | None = None, intake_seq: int | None = None
    ) -> None: ...

    async def dlq(self, handler: str, payload: bytes, *, msg_id: str) -> None: ...

    async def step(self, pipeline: str, payload: bytes, *, msg_id: str) -> None: ...

    async def buffer_many(self, writes: list[BufferWrite]) -> list[bool]: ...
