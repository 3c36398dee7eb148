"""What a source hands the pipeline, and what the pipeline hands back for the buffer
stream: plain data, no I/O. Sources and sinks depend on this module, never on the
pipeline itself."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from service.core.errors import BadItemError
from service.core.items import Item


@dataclass(frozen=True)
class Intake:
    """One message as the source hands it over."""

    raw: bytes
    handler: str
    subject: str
    received_at: datetime
    seq: int | None = None  # intake stream sequence; None for sync requests


@dataclass(frozen=True)
class Prepared:
    """An intake message, parsed once: a good item (``error`` is None, ``item`` and
    ``body`` set) or a bad one (``error`` set; ``item`` kept when only the handler or the
    template failed, for the DLQ entry)."""

    intake: Intake
    item: Item | None
    body: dict[str, Any] | None
    error: BadItemError | None = None


@dataclass(frozen=True)
class BufferWrite:
    """A batch-routed item's buffer message, encoded and ready to publish."""

    handler: str
    subject_token: str
    payload: bytes
    msg_id: str
    deadline: datetime | None = None  # the item's: it may be promoted (CONTRACT §11)


class DeferError(Exception):
    """Not now: leave the message in NATS and try again after ``delay_s``."""

    def __init__(self, delay_s: float, reason: str) -> None:
        super().__init__(reason)
        self.delay_s = delay_s
        self.reason = reason
