"""What the daemon knows of one provider batch, provider-neutral and pure: its status,
files, counts, validation errors and the flush it was made for (``metadata``)."""

from __future__ import annotations

from dataclasses import dataclass, field

TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
KEY_FIELD = "enrichd_flush"


@dataclass(frozen=True)
class BatchError:
    code: str
    message: str
    line: int | None


@dataclass(frozen=True)
class BatchInfo:
    id: str
    status: str
    created_at: int
    output_file_id: str | None
    error_file_id: str | None
    request_counts: dict[str, int]
    errors: list[BatchError] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    @property
    def flush_id(self) -> str | None:
        return self.metadata.get(KEY_FIELD)
