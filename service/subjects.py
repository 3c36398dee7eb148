"""Subject and stream names (CONTRACT §1), derived from ``nats.subject_prefix``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Subjects:
    prefix: str = "enrich"

    @property
    def stream_suffix(self) -> str:
        # Streams are ENRICH_IN etc. for the default prefix; another prefix gets its own
        # streams so two deployments can share one NATS without mixing data.
        return self.prefix.upper().replace(".", "_").replace("-", "_")

    def stream(self, kind: str) -> str:
        return f"{self.stream_suffix}_{kind}"

    @property
    def intake_filter(self) -> str:
        return f"{self.prefix}.in.>"

    @property
    def intake_prefix(self) -> str:
        return f"{self.prefix}.in."

    @property
    def sync_filter(self) -> str:
        return f"{self.prefix}.sync.*"

    @property
    def sync_prefix(self) -> str:
        return f"{self.prefix}.sync."

    def out(self, handler: str) -> str:
        return f"{self.prefix}.out.{handler}"

    def dlq(self, handler: str) -> str:
        return f"{self.prefix}.dlq.{handler}"

    def event(self, topic: str) -> str:
        return f"{self.prefix}.events.{topic}"

    def buffer(self, key_token: str) -> str:
        return f"{self.prefix}._buffer.{key_token}"

    @property
    def buffer_filter(self) -> str:
        return f"{self.prefix}._buffer.>"

    def control(self, action: str) -> str:
        return f"{self.prefix}._control.{action}"

    @property
    def results_bucket(self) -> str:
        return f"{self.stream_suffix}_RESULTS"
