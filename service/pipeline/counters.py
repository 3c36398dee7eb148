"""The pipeline's tallies, for the final line of counters at shutdown."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Counters:
    received: int = 0
    ok: int = 0
    error: int = 0
    cached: int = 0
    buffered: int = 0
    retries: int = 0
    steps: int = 0  # pipeline steps ended (their items end once, in ok/error)
    by_code: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"received={self.received} ok={self.ok} error={self.error} cached={self.cached} "
            f"buffered={self.buffered} retries={self.retries} steps={self.steps}"
        )
