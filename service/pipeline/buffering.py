"""The batch route's side of intake: an item's buffer message (traced or not), published
and counted, its deadline handed to the promoter (CONTRACT §11)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from opentelemetry import trace

from handlers import HandlerSpec
from service import failpoints
from service.core.errors import EnrichError
from service.core.intake import BufferWrite, Prepared, buffer_write, too_large_to_buffer
from service.core.routing import BatchRoute
from service.observability import tracing
from service.pipeline.config import PipelineConfig
from service.pipeline.counters import Counters
from service.pipeline.ports import Sink
from service.pipeline.promote import Promoter


class Buffering:
    def __init__(
        self,
        *,
        config: PipelineConfig,
        sink: Sink,
        counters: Counters,
        tracer: trace.Tracer,
        on_buffered: Callable[[], None] | None,
    ) -> None:
        self._config = config
        self._sink = sink
        self._counters = counters
        self._tracer = tracer
        self._on_buffered = on_buffered
        self.promoter: Promoter | None = None

    def traced_write(self, prepared: Prepared, decision: BatchRoute) -> BufferWrite | None:
        """The buffer message of a traced batch-routed item, with the ``enrich.buffer``
        span under the source's intake span; None when the traceparent makes it too long
        (it is then ended per item)."""
        item = prepared.item
        assert item is not None
        trace.get_current_span().set_attributes(tracing.item_attributes(item.id, item.handler, route="batch"))
        spec = self._config.registry[prepared.handler]
        attributes = lambda: tracing.item_attributes(item.id, item.handler, model=spec.model)  # noqa: E731
        with tracing.span(self._tracer, "enrich.buffer", attributes):
            traced = buffer_write(
                prepared.intake,
                item,
                decision,
                traceparent=tracing.current_traceparent(),
                chain=prepared.chain,
            )
        return traced if len(traced.payload) <= self._config.max_message_bytes else None

    async def buffer(
        self,
        prepared: Prepared,
        spec: HandlerSpec,
        decision: BatchRoute,
        finish_bad: Callable[[Prepared, EnrichError], Awaitable[dict[str, Any]]],
    ) -> dict[str, Any] | None:
        """Buffer a batch-routed item (None), or end it as ``item_too_large`` when its
        buffer message would not fit a NATS message (its event)."""
        item = prepared.item
        assert item is not None
        attributes = lambda: tracing.item_attributes(item.id, item.handler, model=spec.model)  # noqa: E731
        with tracing.span(self._tracer, "enrich.buffer", attributes):
            # The batch hop: the result span will continue this trace (see service/tracing.py).
            write = buffer_write(
                prepared.intake,
                item,
                decision,
                traceparent=tracing.current_traceparent(),
                chain=prepared.chain,
            )
            if len(write.payload) > self._config.max_message_bytes:
                return await finish_bad(
                    prepared, too_large_to_buffer(len(write.payload), self._config.max_message_bytes)
                )
            [stored] = await self.store([write])
        if not stored:  # the source NAKs the intake message: it comes back later
            raise RuntimeError(f"buffer write for {item.handler}:{item.id} was not stored")
        return None

    async def store(self, writes: list[BufferWrite]) -> list[bool]:
        """Publish buffer messages; True for each one JetStream stored."""
        stored = await self._sink.buffer_many(writes)
        for write, ok in zip(writes, stored, strict=True):
            if ok:
                self._counters.buffered += 1
                if write.deadline is not None and self.promoter is not None:
                    self.promoter.buffered(write.payload, write.deadline)
                failpoints.hit("after_buffer")  # buffered, intake not yet acked
        if self._on_buffered is not None and any(stored):
            self._on_buffered()
        return stored
