"""Subject and stream names (CONTRACT §1), derived from ``nats.subject_prefix``."""

from __future__ import annotations

from dataclasses import dataclass

# A handler name is one plain subject token. Anything else that arrives as a handler
# (``enrich.in.*``, ``enrich.in.>``, ``enrich.in.a.b``: JetStream stores such subjects
# literally) is answered on ``<prefix>.out._invalid`` / ``.dlq._invalid``, never on a
# subject that a wildcard would turn into many (``enrich.out.>``).
INVALID_HANDLER = "_invalid"
_NOT_IN_A_TOKEN = frozenset(".*>")


def handler_token(handler: str) -> str:
    plain = 0 < len(handler) <= 128 and not any(c in _NOT_IN_A_TOKEN or c.isspace() for c in handler)
    return handler if plain else INVALID_HANDLER


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

    def intake(self, handler: str) -> str:
        """``<prefix>.in.<handler>``: also where a pipeline's next step is published."""
        return f"{self.prefix}.in.{handler_token(handler)}"

    def out(self, handler: str) -> str:
        return f"{self.prefix}.out.{handler_token(handler)}"

    def dlq(self, handler: str) -> str:
        return f"{self.prefix}.dlq.{handler_token(handler)}"

    @property
    def out_filter(self) -> str:
        return f"{self.prefix}.out.>"

    @property
    def dlq_filter(self) -> str:
        return f"{self.prefix}.dlq.>"

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
