"""What happens to one intake message, up to its durable next step: parse (once), route,
answer from the result store, buffer for a batch, or call the provider once per
(handler, id) at a time. Orchestration only: the decisions live in service/core and
handlers/, the provider call in sync_call.py, the ending in finish.py, the I/O behind
the ports passed in (pipeline/ports.py)."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import random
from collections.abc import Callable
from typing import Any

from opentelemetry import trace

from handlers import HandlerSpec
from service.core import endings
from service.core.budget import seconds_until_next_day
from service.core.cost import supports_flex
from service.core.errors import EnrichError, ErrorInfo
from service.core.events import Outcome
from service.core.intake import (
    BufferWrite,
    DeferError,
    Intake,
    Prepared,
    buffer_record,
    buffer_write,
    prepare,
)
from service.core.items import Item
from service.core.routing import (
    BatchRoute,
    BufferKey,
    FlexRoute,
    Route,
    flex_allowed,
    route,
)
from service.observability import telemetry, tracing
from service.observability.telemetry import Metrics
from service.pipeline.buffering import Buffering
from service.pipeline.chained import Chained
from service.pipeline.config import Clock, PipelineConfig, utcnow
from service.pipeline.counters import Counters
from service.pipeline.finish import Finish
from service.pipeline.packer import Packer
from service.pipeline.ports import Alerts, Ledger, Limiter, Provider, Sink, Store
from service.pipeline.promote import PromotedAnswer, Promoter
from service.pipeline.sync_call import SyncCall
from service.state.budget import BudgetExhaustedError
from service.state.promoted import PromotedMarks
from service.state.results import StoredResult

log = logging.getLogger("enrichd.pipeline")

__all__ = ["Clock", "Counters", "Pipeline", "PipelineConfig", "buffer_record", "buffer_write", "utcnow"]


class Pipeline:
    """The intake side of the daemon, as the sources see it (service/sources' Protocol)."""

    def __init__(
        self,
        config: PipelineConfig,
        *,
        provider: Provider,
        store: Store,
        sink: Sink,
        clock: Clock = utcnow,
        rng: random.Random | None = None,
        limiter: Limiter | None = None,
        ledger: Ledger | None = None,
        metrics: Metrics | None = None,
        alerts: Alerts | None = None,
        tracer: trace.Tracer | None = None,
        on_buffered: Callable[[], None] | None = None,
        budget_recheck_s: float = 60.0,
        marks: PromotedMarks | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.sink = sink
        self.clock = clock
        self.ledger = ledger
        self.tracer: trace.Tracer = tracer or trace.NoOpTracer()
        self.counters = Counters()
        self._metrics = metrics or telemetry.build(False)[0]
        self._budget_recheck_s = budget_recheck_s
        self._sync_call = SyncCall(
            provider=provider,
            retry=config.retry,
            prices=config.prices,
            batch_discount=config.batch_discount,
            clock=clock,
            rng=rng or random.Random(),
            counters=self.counters,
            metrics=self._metrics,
            tracer=self.tracer,
            limiter=limiter,
            ledger=ledger,
            alerts=alerts,
            flex_timeout_s=config.rules.flex_timeout_s,
            flex_lead_s=config.rules.flex_lead_s,
        )
        self._packer = Packer(
            self._sync_call,
            prices=config.prices,
            batch_discount=config.batch_discount,
            limits=config.pack_limits,
            linger_s=config.pack_linger_s,
            max_tokens_param=config.max_tokens_param,
        )
        # Which handlers may go flex (routing.flex or the handler's own flex key, and a
        # model with a flex price), decided once.
        self._flex = {
            name: flex_allowed(
                handler_flex=spec.flex,
                routing_flex=config.rules.flex,
                model_has_flex=supports_flex(spec.model, config.prices),
                chat=not spec.is_embedding,
            )
            for name, spec in config.registry.items()
        }
        self._finish = Finish(
            store=store,
            sink=sink,
            counters=self.counters,
            metrics=self._metrics,
            clock=clock,
            alerts=alerts,
            pipelines=config.pipelines,
            intake_prefix=config.intake_prefix,
        )
        self._chained = Chained(
            config=config,
            store=store,
            finish=self._finish,
            clock=clock,
            answer_step=self._answer_step,
            finish_bad=self._finish_bad,
        )
        self.promoter: Promoter | None = None
        if marks is not None:
            answer = PromotedAnswer(
                config=config,
                store=store,
                clock=clock,
                flex=self._flex,
                packer=self._packer,
                finish=self._finish,
            )
            self.promoter = Promoter(answer=answer, marks=marks, rules=config.rules, clock=clock)
        self._buffering = Buffering(
            config=config, sink=sink, counters=self.counters, tracer=self.tracer, on_buffered=on_buffered
        )
        self._buffering.promoter = self.promoter
        # (handler, id) -> the call in flight and the intake sequence it answers
        self._sync_flights: dict[
            tuple[str, str], tuple[asyncio.Future[dict[str, Any] | None], int | None]
        ] = {}

    # -- entry points -------------------------------------------------------------------

    def prepare(self, intake: Intake) -> Prepared:
        """Parse and validate, once (service/core/intake.py, ``prepare``)."""
        return prepare(
            intake,
            self.config.registry,
            max_item_bytes=self.config.max_item_bytes,
            max_tokens_param=self.config.max_tokens_param,
            pipelines=self.config.pipelines,
        )

    def buffer_now(self, intake: Intake) -> BufferWrite | Prepared:
        """Intake's fast path, with no I/O: a good item routed to a batch buffer gets its
        buffer message (the source publishes a whole fetch of them at once with
        :meth:`buffer_many`); anything else comes back parsed, for :meth:`process`."""
        prepared = self.prepare(intake)
        if prepared.error is not None or _starts_pipeline(prepared):
            return prepared  # (a pipeline's own stored answer is looked up first, in process())
        decision = self._route(prepared)
        if not isinstance(decision, BatchRoute):
            return prepared
        item = prepared.item
        assert item is not None
        write = buffer_write(intake, item, decision, chain=prepared.chain)
        if len(write.payload) > self.config.max_message_bytes:
            return prepared  # process() ends it as item_too_large
        if not tracing.enabled(self.tracer):
            return write
        traced = self._buffering.traced_write(prepared, decision)
        return traced if traced is not None else prepared

    async def buffer_many(self, writes: list[BufferWrite]) -> list[bool]:
        """Publish buffer messages from :meth:`buffer_now`; True for each one JetStream
        stored (only those intake messages may be acked)."""
        self.counters.received += len(writes)
        for handler, count in collections.Counter(w.handler for w in writes).items():
            self._metrics.received.add(count, {"handler": handler})  # once per handler: ~6 µs a call
        return await self._buffering.store(writes)

    async def process(self, intake: Intake | Prepared, *, force_sync: bool = False) -> dict[str, Any] | None:
        """Handle one intake message completely: when this returns, its result event (or
        its buffered record) is durable and the source may ack. Returns the result event,
        or None when the item went to a batch buffer. Raises DeferError for "not now"."""
        prepared = intake if isinstance(intake, Prepared) else self.prepare(intake)
        msg = prepared.intake
        chain = prepared.chain
        if chain is None or _starts_pipeline(prepared):
            self.counters.received += 1
            self._metrics.received.add(1, {"handler": msg.handler})
        if chain is not None and msg.seq is None:
            return await self._chained.run_here(prepared)
        if prepared.error is not None:
            return await self._finish_bad(prepared, prepared.error)
        item, body = prepared.item, prepared.body
        assert item is not None and body is not None
        if chain is not None and _starts_pipeline(prepared):
            answered = await self._chained.answered(prepared)
            if answered is not None:
                return answered
        spec = self.config.registry[item.handler]
        decision = self._route(prepared)
        batched = isinstance(decision, BatchRoute) and not force_sync
        if not batched:
            # Batched items are looked up in the store when their buffer is flushed, many
            # at once (batch/publisher.py, answer_stored), which keeps intake at one round trip.
            stored = await self.store.get(item.handler, item.id, spec.version)
            if stored is not None:
                return await self._finish.from_store(msg, item, stored, chain=chain)
        if tracing.enabled(self.tracer):
            trace.get_current_span().set_attributes(
                tracing.item_attributes(item.id, item.handler, route="batch" if batched else "sync")
            )
        if isinstance(decision, BatchRoute) and batched:
            return await self._buffering.buffer(prepared, spec, decision, self._finish_bad)
        tier = "flex" if isinstance(decision, FlexRoute) and not force_sync else "sync"
        return await self._single_flight(prepared, spec, body, force_sync=force_sync, route=tier)

    async def finish(self, outcome: Outcome, *, item: Item | None, intake: Intake) -> dict[str, Any]:
        """Write an item's ending (see finish.py); for sources that end a message
        themselves (max deliveries). A pipeline's message ends its pipeline (with the
        error naming the step it was at)."""
        if intake.handler in self.config.pipelines and outcome.error is not None:
            prepared = self.prepare(intake)
            if prepared.chain is not None and prepared.item is not None:
                step_outcome = dataclasses.replace(
                    outcome, id=prepared.item.id, handler=prepared.item.handler, model=None
                )
                return await self._finish.finish(
                    step_outcome, item=prepared.item, intake=intake, chain=prepared.chain
                )
        return await self._finish.finish(outcome, item=item, intake=intake)

    async def _answer_step(self, prepared: Prepared) -> dict[str, Any]:
        """One step of a pipeline run at once (pipeline/chained.py): from the store, else
        a sync call; its ending written (stored), its event returned."""
        item, body = prepared.item, prepared.body
        assert item is not None and body is not None
        spec = self.config.registry[item.handler]
        stored = await self.store.get(item.handler, item.id, spec.version)
        if stored is not None:
            return await self._finish.from_store(prepared.intake, item, stored, chain=prepared.chain)
        answer = await self._single_flight(prepared, spec, body, force_sync=True)
        assert answer is not None
        return answer

    # -- the sync route -------------------------------------------------------------------

    def _route(self, prepared: Prepared) -> Route:
        assert prepared.item is not None
        spec = self.config.registry[prepared.handler]
        return route(
            prepared.item,
            endpoint=spec.endpoint,
            model=spec.model,
            rules=self.config.rules,
            now=self.clock(),
            flex=self._flex.get(spec.name, False),
        )

    async def _single_flight(
        self,
        prepared: Prepared,
        spec: HandlerSpec,
        body: dict[str, Any],
        *,
        force_sync: bool,
        route: str = "sync",
    ) -> dict[str, Any] | None:
        """One provider call per (handler, id) at a time in this replica: a copy that
        arrives meanwhile waits for it and gets its answer as ``cached``; the same intake
        message delivered again gets the very answer."""
        intake, item = prepared.intake, prepared.item
        assert item is not None
        key = (item.handler, item.id)
        leading = self._sync_flights.get(key)
        if leading is not None:
            leader, leader_seq = leading
            answer = await asyncio.shield(leader)
            if answer is not None and intake.seq is not None and leader_seq == intake.seq:
                return answer  # the same intake message, delivered again: its answer is out
            if answer is not None and answer.get("status") == "ok":
                return await self._finish.from_store(
                    intake, item, StoredResult(answer, leader_seq), chain=prepared.chain
                )
        flight: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._sync_flights[key] = (flight, intake.seq)
        event: dict[str, Any] | None = None
        try:
            event = await self._sync(prepared, spec, body, force_sync=force_sync, route=route)
            return event
        finally:
            flight.set_result(event)
            if self._sync_flights.get(key, (None, None))[0] is flight:
                del self._sync_flights[key]

    async def _sync(
        self, prepared: Prepared, spec: HandlerSpec, body: dict[str, Any], *, force_sync: bool, route: str
    ) -> dict[str, Any] | None:
        intake, item = prepared.intake, prepared.item
        assert item is not None
        try:
            # Intake items may share a request with others of their handler (pack > 1);
            # a request on enrich.sync is answered alone, with no linger.
            outcome = await self._packer.run(
                spec,
                item,
                body,
                received_at=intake.received_at,
                packable=intake.seq is not None,
                route=route,
                steps=prepared.chain.results if prepared.chain is not None else None,
            )
        except BudgetExhaustedError as exc:
            if not force_sync and item.priority not in ("urgent", "high"):
                # Deadline work that the sync budget cannot pay for goes the cheaper way.
                key = BufferKey(self.config.rules.provider, spec.endpoint, spec.model)
                return await self._buffering.buffer(prepared, spec, BatchRoute(key), self._finish_bad)
            if force_sync:
                outcome = Outcome(
                    id=item.id,
                    handler=item.handler,
                    route="sync",
                    model=spec.model,
                    received_at=intake.received_at,
                    completed_at=self.clock(),
                    error=ErrorInfo("budget_exceeded", str(exc), True),
                    metadata=item.metadata,
                    source=item.source,
                    handler_version=spec.version,
                )
                return await self._finish.finish(outcome, item=item, intake=intake, chain=prepared.chain)
            raise DeferError(
                min(self._budget_recheck_s, seconds_until_next_day(self.clock())), str(exc)
            ) from None
        return await self._finish.finish(outcome, item=item, intake=intake, chain=prepared.chain)

    async def _finish_bad(self, prepared: Prepared, exc: EnrichError) -> dict[str, Any]:
        intake = prepared.intake
        spec = self.config.registry.get(prepared.handler)
        outcome = endings.salvaged_outcome(
            intake.raw,
            prepared.handler,
            exc.info(),
            received_at=intake.received_at,
            now=self.clock(),
            model=spec.model if spec else None,
            item=prepared.item,
        )
        if prepared.chain is not None and prepared.item is not None:  # a step that cannot run
            outcome = dataclasses.replace(outcome, handler_version=spec.version if spec else None)
            return await self._finish.finish(outcome, item=prepared.item, intake=intake, chain=prepared.chain)
        return await self._finish.finish(outcome, item=prepared.item, intake=intake)


def _starts_pipeline(prepared: Prepared) -> bool:
    """An item fed to a pipeline from outside (not a later step's message)."""
    chain = prepared.chain
    return (
        chain is not None and chain.index == 0 and not chain.done and chain.origin_seq == prepared.intake.seq
    )
