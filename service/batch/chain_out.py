"""What the batch path publishes when a pipeline step (CONTRACT §14) ends in a batch:
the next step's message on ``<prefix>.in.<pipeline>``, or the pipeline's final ending
(service/core/chain.py). These messages go out in the batch's checkpointed chunks, so a
restart resends them under the same ids."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from datetime import datetime
from typing import Any

from service.contract.subjects import Subjects
from service.core import chain as chain_core
from service.core import endings
from service.core.chain import ChainState
from service.core.pipelines import PipelineSpec
from service.observability.telemetry import Metrics
from service.sinks.events import Redactor, dumps
from service.state.results import ResultStore

log = logging.getLogger("enrichd.batch")
# subject, payload, headers
Message = tuple[str, bytes, dict[str, str]]


class StepOut:
    def __init__(
        self,
        *,
        subjects: Subjects,
        results: ResultStore,
        redact: Redactor,
        pipelines: Mapping[str, PipelineSpec],
        metrics: Metrics,
        calendar: Callable[[], datetime],
        max_message_bytes: int,
    ) -> None:
        self.subjects = subjects
        self.results = results
        self.redact = redact
        self.pipelines = pipelines
        self.metrics = metrics
        self.calendar = calendar
        self.max_message_bytes = max_message_bytes

    def state_of(self, record: dict[str, Any]) -> ChainState | None:
        """A pipeline step's state (None for a plain item, or one of a pipeline no longer
        configured: its step's answer is then published as the handler's own)."""
        chain = record.get("chain")
        if not chain or chain.get("pipeline") not in self.pipelines:
            return None
        return ChainState.from_dict(chain, record["item"])

    def after(self, record: dict[str, Any], step_event: dict[str, Any]) -> list[Message]:
        """What follows a batched pipeline step that ended with ``step_event``: the next
        step's message on ``<prefix>.in.<pipeline>``, or the pipeline's final ending (its
        event, and its stored answer or its DLQ entry) — service/core/chain.py."""
        state = self.state_of(record)
        assert state is not None
        pipeline = self.pipelines[state.pipeline]
        after = chain_core.after_step(pipeline, state, step_event, now=self.calendar())
        if isinstance(after, chain_core.NextStep):
            body = self.redact(dumps(after.state.envelope())).encode()
            if len(body) <= self.max_message_bytes:
                return [(self.subjects.intake(pipeline.name), body, {"Nats-Msg-Id": after.msg_id})]
            after = chain_core.too_large(
                pipeline, after.state, len(body), self.max_message_bytes, now=self.calendar()
            )
        ending = endings.end(
            after.outcome,
            intake_seq=state.origin_seq,
            subject=self.subjects.intake_prefix + pipeline.name,
            item=state.item,
            raw=None,
            encode=lambda e: self.redact(dumps(e)).encode(),
            max_dlq_bytes=self.max_message_bytes,
            header_on_error=False,
            extra=after.extra,
        )
        out: list[Message] = []
        event_json = dumps(ending.event)
        if after.outcome.ok:
            out.append(
                (
                    *self.results.put_message_json(
                        pipeline.name, state.item["id"], event_json, intake_seq=state.origin_seq
                    ),
                    {},
                )
            )
        else:
            assert ending.dlq_payload is not None and ending.dlq_msg_id is not None
            out.append(
                (self.subjects.dlq(pipeline.name), ending.dlq_payload, {"Nats-Msg-Id": ending.dlq_msg_id})
            )
            log.log(ending.log_level, ending.log_message, extra=ending.log_fields)
        self.metrics.outcome(
            ending.event, (after.outcome.completed_at - after.outcome.received_at).total_seconds()
        )
        out.append((self.subjects.out(pipeline.name), self.redact(event_json).encode(), ending.headers))
        return out
