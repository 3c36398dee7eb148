"""What the sources need of the pipeline: a Protocol, so that no source imports it."""

from __future__ import annotations

from typing import Any, Protocol

from opentelemetry import trace

from service.core.events import Outcome
from service.core.intake import BufferWrite, Intake, Prepared
from service.core.items import Item


class IntakePipeline(Protocol):
    """What the source needs of the pipeline (service/pipeline/process.py's Pipeline)."""

    @property
    def tracer(self) -> trace.Tracer: ...

    def buffer_now(self, intake: Intake) -> BufferWrite | Prepared:
        """No I/O: a batch-routed good item's buffer message, else the parsed intake."""
        ...

    async def buffer_many(self, writes: list[BufferWrite]) -> list[bool]:
        """Publish buffer messages; True for each one stored (only those may be acked)."""
        ...

    async def process(self, intake: Intake | Prepared, *, force_sync: bool = False) -> dict[str, Any] | None:
        """The message's durable next step (raises DeferError for "not now")."""
        ...

    async def finish(self, outcome: Outcome, *, item: Item | None, intake: Intake) -> dict[str, Any]:
        """Write an ending: result event and DLQ entry (or store put)."""
        ...
