"""What the batch path needs from the rest of the daemon, as Protocols (built in app.py)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Protocol


class Promotions(Protocol):
    """Promotion of items waiting for a batch (service/pipeline/promote.py)."""

    def due(self, record: dict[str, Any]) -> bool:
        """The item's deadline is within the promotion margin now."""
        ...

    def busy(self, record: dict[str, Any]) -> bool:
        """It is being promoted in this replica now."""
        ...

    def wanted(self, record: dict[str, Any]) -> None:
        """Promote it now (scheduled; done by the promoter's loop)."""
        ...

    def promote_at(self, records: Iterable[dict[str, Any]]) -> float | None:
        """When the first of these is due (epoch seconds)."""
        ...

    def mark_message(self, record: dict[str, Any]) -> tuple[str, bytes]:
        """The KV put (subject, payload) that marks this intake message as ended."""
        ...

    async def taken(self) -> set[str]:
        """Keys of intake messages answered by promotion (state/promoted.py)."""
        ...
