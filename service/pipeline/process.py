"""What happens to one item, from raw bytes to its result event. Orchestration only:
the decisions live in service/core (parsing, routing, retry, cost) and handlers/, the I/O
behind the ports passed in (provider, result store, event sink)."""

from __future__ import annotations

import asyncio
import collections
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from handlers import HandlerSpec
from service import failpoints
from service.core import fastjson
from service.core import retry as retry_core
from service.core.budget import seconds_until_next_day
from service.core.cost import Price, Usage, cost_usd, price_for
from service.core.errors import BadItemError, EnrichError, ErrorInfo, InvalidOutputError, ProviderError
from service.core.events import Outcome, dlq_entry, iso, result_event, result_msg_id, stored_answer
from service.core.items import Item, decode_object, item_from_object, salvage
from service.core.routing import BatchRoute, BufferKey, RoutingRules, route
from service.core.tokens import estimate_request_tokens
from service.observability import telemetry, tracing
from service.observability.alerts import Alerter
from service.observability.telemetry import Metrics
from service.providers.openai_sync import ProviderResponse, SyncProvider
from service.state.budget import BudgetExhaustedError, Ledger
from service.state.results import StoredResult

log = logging.getLogger("enrichd.pipeline")


class Store(Protocol):
    async def get(self, handler: str, item_id: str) -> StoredResult | None: ...

    async def put(self, event: dict[str, Any], *, intake_seq: int | None) -> None: ...


class Limiter(Protocol):
    async def acquire(self, model: str, *, tokens: int, urgent: bool) -> float: ...

    async def settle(self, model: str, *, estimated: int, actual: int) -> None: ...

    def observe(self, model: str, headers: dict[str, str]) -> None: ...


class Sink(Protocol):
    async def result(
        self, event: dict[str, Any], *, msg_id: str | None = None, intake_seq: int | None = None
    ) -> None: ...

    async def dlq(self, entry: dict[str, Any], *, item_id: str, intake_seq: int | None) -> None: ...

    async def buffer_many(self, writes: list[BufferWrite]) -> list[bool]: ...


@dataclass(frozen=True)
class BufferWrite:
    """A batch-routed item's buffer message, encoded and ready to publish (see
    Pipeline.buffer_now)."""

    handler: str
    subject_token: str
    payload: bytes
    msg_id: str


class DeferError(Exception):
    """Not now: leave the message in NATS and try again after ``delay_s``."""

    def __init__(self, delay_s: float, reason: str) -> None:
        super().__init__(reason)
        self.delay_s = delay_s
        self.reason = reason


@dataclass(frozen=True)
class Intake:
    """One message as the source hands it over."""

    raw: bytes
    handler: str
    subject: str
    received_at: datetime
    seq: int | None = None  # intake stream sequence; None for sync requests
    priority: str | None = None  # default priority for items without one (folders)


@dataclass
class Counters:
    received: int = 0
    ok: int = 0
    error: int = 0
    cached: int = 0
    buffered: int = 0
    retries: int = 0
    by_code: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        return (
            f"received={self.received} ok={self.ok} error={self.error} cached={self.cached} "
            f"buffered={self.buffered} retries={self.retries}"
        )


@dataclass(frozen=True)
class PipelineConfig:
    registry: dict[str, HandlerSpec]
    rules: RoutingRules
    retry: retry_core.RetryPolicy
    prices: dict[str, Price]
    batch_discount: float
    max_item_bytes: int
    max_tokens_param: str = "max_completion_tokens"
    # The largest message the daemon may write (the server's max_payload, less room for
    # headers): an item whose buffer record would not fit is ``item_too_large`` at intake.
    max_message_bytes: int = 1024 * 1024 - 16 * 1024


Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)


class Pipeline:
    def __init__(
        self,
        config: PipelineConfig,
        *,
        provider: SyncProvider,
        store: Store,
        sink: Sink,
        clock: Clock = utcnow,
        rng: random.Random | None = None,
    ) -> None:
        self.config = config
        self.provider = provider
        self.store = store
        self.sink = sink
        self.clock = clock
        self.rng = rng or random.Random()
        self.counters = Counters()
        self.on_buffered: Callable[[], None] | None = None
        self.limiter: Limiter | None = None
        self.ledger: Ledger | None = None
        self.metrics: Metrics = telemetry.build(False)[0]
        self.alerts: Alerter | None = None
        self.tracer: trace.Tracer = trace.NoOpTracer()
        self.budget_recheck_s = 60.0
        # (handler, id) -> the call in flight and the intake sequence it answers
        self._sync_flights: dict[
            tuple[str, str], tuple[asyncio.Future[dict[str, Any] | None], int | None]
        ] = {}

    # -- entry points -------------------------------------------------------------------

    async def process(self, intake: Intake, *, force_sync: bool = False) -> dict[str, Any] | None:
        """Handle one intake message completely: when this returns, its result event (or
        its buffered record) is durable and the source may ack. Returns the result event,
        or None when the item went to a batch buffer."""
        self.counters.received += 1
        self.metrics.received.add(1, {"handler": intake.handler})
        try:
            spec, item, body = self.prepare(intake)
        except BadItemError as exc:
            return await self._finish_bad(intake, exc)
        decision = route(
            item, endpoint=spec.endpoint, model=spec.model, rules=self.config.rules, now=self.clock()
        )
        batched = isinstance(decision, BatchRoute) and not force_sync
        if not batched:
            # Batched items are looked up in the store when their buffer is flushed, many
            # at once (Batcher._answer_stored), which keeps intake at one round trip.
            stored = await self.store.get(item.handler, item.id)
            if stored is not None:
                return await self._answer_from_store(intake, item, stored)
        if tracing.enabled(self.tracer):
            trace.get_current_span().set_attributes(
                tracing.item_attributes(item.id, item.handler, route="batch" if batched else "sync")
            )
        if isinstance(decision, BatchRoute) and not force_sync:
            return await self._buffer(intake, item, spec, decision)
        # One provider call per (handler, id) at a time in this replica: a copy that
        # arrives meanwhile waits for it and gets its answer as `cached`.
        key = (item.handler, item.id)
        leading = self._sync_flights.get(key)
        if leading is not None:
            leader, leader_seq = leading
            answer = await asyncio.shield(leader)
            if answer is not None and intake.seq is not None and leader_seq == intake.seq:
                return answer  # the same intake message, delivered again: its answer is out
            if answer is not None and answer.get("status") == "ok":
                return await self._answer_from_store(intake, item, StoredResult(answer, leader_seq))
        flight: asyncio.Future[dict[str, Any] | None] = asyncio.get_running_loop().create_future()
        self._sync_flights[key] = (flight, intake.seq)
        event: dict[str, Any] | None = None
        try:
            event = await self._sync(intake, item, spec, body, force_sync=force_sync)
            return event
        finally:
            flight.set_result(event)
            if self._sync_flights.get(key, (None, None))[0] is flight:
                del self._sync_flights[key]

    def buffer_now(self, intake: Intake) -> BufferWrite | None:
        """Intake's fast path, with no I/O: when the item is good and routed to a batch
        buffer (and no per-item span is wanted), its buffer message. The source then
        publishes a whole fetch of them at once (:meth:`buffer_many`). None: the item
        takes :meth:`process`, which also gives bad items their error event."""
        if tracing.enabled(self.tracer):
            return None
        try:
            spec, item, body = self.prepare(intake)
        except Exception:  # noqa: BLE001 - bad items (and anything unforeseen) go the full way
            return None
        decision = route(
            item, endpoint=spec.endpoint, model=spec.model, rules=self.config.rules, now=self.clock()
        )
        if not isinstance(decision, BatchRoute):
            return None
        write = buffer_write(intake, item, decision)
        if len(write.payload) > self.config.max_message_bytes:
            return None  # process() ends it as item_too_large
        return write

    async def buffer_many(self, writes: list[BufferWrite]) -> list[bool]:
        """Publish buffer messages from :meth:`buffer_now`; True for each one JetStream
        stored (only those intake messages may be acked)."""
        self.counters.received += len(writes)
        for handler, count in collections.Counter(w.handler for w in writes).items():
            self.metrics.received.add(count, {"handler": handler})  # once per handler: ~6 µs a call
        return await self._store_buffered(writes)

    async def _store_buffered(self, writes: list[BufferWrite]) -> list[bool]:
        stored = await self.sink.buffer_many(writes)
        for ok in stored:
            if ok:
                self.counters.buffered += 1
                failpoints.hit("after_buffer")  # buffered, intake not yet acked
        if self.on_buffered is not None and any(stored):
            self.on_buffered()
        return stored

    async def _sync(
        self, intake: Intake, item: Item, spec: HandlerSpec, body: dict[str, Any], *, force_sync: bool
    ) -> dict[str, Any] | None:
        try:
            outcome = await self.run_sync(spec, item, body, received_at=intake.received_at)
        except BudgetExhaustedError as exc:
            if not force_sync and item.priority not in ("urgent", "high"):
                # Deadline work that the sync budget cannot pay for goes the cheaper way.
                return await self._buffer(
                    intake,
                    item,
                    spec,
                    BatchRoute(BufferKey(self.config.rules.provider, spec.endpoint, spec.model)),
                )
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
                )
                return await self.finish(outcome, item=item, intake=intake)
            raise DeferError(
                min(self.budget_recheck_s, seconds_until_next_day(self.clock())), str(exc)
            ) from None
        return await self.finish(outcome, item=item, intake=intake)

    def prepare(self, intake: Intake) -> tuple[HandlerSpec, Item, dict[str, Any]]:
        """Parse and validate; raises BadItemError. Size, then handler, then content."""
        data = decode_object(intake.raw, max_bytes=self.config.max_item_bytes)
        spec = self.config.registry.get(intake.handler)
        if spec is None:
            raise BadItemError("unknown_handler", f"no handler named {intake.handler!r}")
        item = item_from_object(data, intake.handler, priority=intake.priority)  # type: ignore[arg-type]
        body = spec.build_body(item, max_tokens_param=self.config.max_tokens_param)
        return spec, item, body

    # -- sync path ------------------------------------------------------------------------

    async def run_sync(
        self, spec: HandlerSpec, item: Item, body: dict[str, Any], *, received_at: datetime
    ) -> Outcome:
        """Call the provider under the retry policy; one retry for invalid output."""
        policy = self.config.retry
        attempt, waits, calls = 1, 0, 0
        started = time.monotonic()
        # Retries stay within the item's deadline (when it was still ahead at the first
        # call: an item already late is still given the whole budget, and answered late).
        ahead = (item.deadline - self.clock()).total_seconds() if item.deadline is not None else None
        deadline_at = started + ahead if ahead is not None and ahead > 0 else None
        spent = Usage(0, 0)
        invalid_retried = False
        last_message: str | None = None
        while True:
            calls += 1
            if self.alerts is not None:
                self.alerts.call(retry=calls > 1)
            try:
                with tracing.span(
                    self.tracer,
                    "enrich.provider.call",
                    lambda n=calls: tracing.item_attributes(  # type: ignore[misc]
                        item.id, item.handler, model=spec.model, attempt=n
                    ),
                    kind=SpanKind.CLIENT,
                ):
                    response = await self._call(spec, item, body)
                spent = Usage(
                    spent.input_tokens + response.usage.input_tokens,
                    spent.output_tokens + response.usage.output_tokens,
                )
                result = spec.parse(response.body)
                return self._outcome(
                    item, received_at, spec.model, result=result, attempts=calls, usage=spent
                )
            except InvalidOutputError as exc:
                last_message = exc.message
                if exc.code == "invalid_output" and not invalid_retried:
                    invalid_retried = True
                    self.counters.retries += 1
                    log.warning(
                        "invalid output, retrying once",
                        extra={"item_id": item.id, "handler": item.handler, "attempt": calls},
                    )
                    continue
                return self._outcome(
                    item,
                    received_at,
                    spec.model,
                    error=exc.info(),
                    attempts=calls,
                    usage=spent,
                    last_message=last_message,
                )
            except ProviderError as exc:
                last_message = exc.message
                decision = retry_core.decide(
                    policy,
                    exc,
                    attempt=attempt,
                    rate_limit_waits=waits,
                    elapsed_s=time.monotonic() - started,
                    rng=self.rng,
                    until_deadline_s=None if deadline_at is None else deadline_at - time.monotonic(),
                )
                if not decision.retry:
                    info = exc.info()
                    if exc.retryable:
                        info = ErrorInfo(exc.code, f"gave up after {calls} calls: {exc.message}", True)
                    return self._outcome(
                        item,
                        received_at,
                        spec.model,
                        error=info,
                        attempts=calls,
                        usage=spent,
                        last_message=last_message,
                    )
                if decision.counts_as_attempt:
                    attempt += 1
                else:
                    waits += 1
                self.counters.retries += 1
                self.metrics.retries.add(1, {"handler": item.handler, "code": exc.code})
                log.info(
                    "provider call failed, retrying",
                    extra={
                        "item_id": item.id,
                        "handler": item.handler,
                        "attempt": calls,
                        "error_code": exc.code,
                        "delay_s": round(decision.delay_s, 3),
                    },
                )
                await asyncio.sleep(decision.delay_s)

    async def _call(self, spec: HandlerSpec, item: Item, body: dict[str, Any]) -> ProviderResponse:
        """One provider call inside the shared rate limit and the daily budget: both are
        reserved at the call's upper bound first and corrected from ``usage`` after."""
        if self.ledger is None and self.limiter is None:  # nothing to reserve: skip tiktoken
            return await self.provider.call(spec.endpoint, body)
        prompt = estimate_request_tokens(body)
        max_out = 0 if spec.is_embedding else spec.max_output_tokens
        planned = prompt + max_out  # providers count the requested max output toward TPM
        price = price_for(spec.model, self.config.prices)
        ceiling = cost_usd(Usage(prompt, max_out), price, route="sync", batch_discount=0.0) or 0.0
        day = await self.ledger.reserve(item.handler, "sync", ceiling) if self.ledger is not None else None
        if self.limiter is not None:
            waited = await self.limiter.acquire(spec.model, tokens=planned, urgent=item.priority == "urgent")
            if waited:
                self.metrics.rate_limit_wait.add(waited, {"model": spec.model})
        try:
            response = await self.provider.call(spec.endpoint, body)
        except BaseException:
            if self.ledger is not None and day is not None:
                await self.ledger.correct(day, item.handler, "sync", -ceiling)  # failed calls are not billed
            raise
        if self.limiter is not None:
            self.limiter.observe(spec.model, response.headers)
            actual = response.usage.input_tokens + max_out
            await self.limiter.settle(spec.model, estimated=planned, actual=actual)
        if self.ledger is not None and day is not None:
            real = cost_usd(response.usage, price, route="sync", batch_discount=0.0) or 0.0
            await self.ledger.correct(day, item.handler, "sync", real - ceiling)
        return response

    def _outcome(
        self,
        item: Item,
        received_at: datetime,
        model: str,
        *,
        attempts: int,
        usage: Usage,
        result: Any = None,
        error: ErrorInfo | None = None,
        last_message: str | None = None,
    ) -> Outcome:
        price = price_for(model, self.config.prices)
        return Outcome(
            id=item.id,
            handler=item.handler,
            route="sync",
            model=model,
            received_at=received_at,
            completed_at=self.clock(),
            result=result,
            error=error,
            attempts=attempts,
            usage=usage,
            cost_usd=cost_usd(usage, price, route="sync", batch_discount=self.config.batch_discount),
            metadata=item.metadata,
            source=item.source,
            last_message=last_message,
        )

    # -- endings --------------------------------------------------------------------------

    async def finish(self, outcome: Outcome, *, item: Item | None, intake: Intake) -> dict[str, Any]:
        """Store (ok results) or dead-letter (errors), and publish the result event; the
        two writes go out together and both are acknowledged before this returns."""
        event = result_event(outcome)
        writes: list[Any] = []
        if outcome.ok:
            writes.append(self.store.put(event, intake_seq=intake.seq))
            self.counters.ok += 1
        else:
            assert outcome.error is not None
            self.counters.error += 1
            self.counters.by_code[outcome.error.code] = self.counters.by_code.get(outcome.error.code, 0) + 1
            entry = dlq_entry(
                id=outcome.id,
                handler=intake.handler,
                item=item.to_dict() if item is not None else None,
                raw=intake.raw if item is None else None,
                error=outcome.error,
                attempts=outcome.attempts,
                subject=intake.subject,
                failed_at=outcome.completed_at,
                last_provider_message=outcome.last_message,
            )
            writes.append(self.sink.dlq(entry, item_id=outcome.id, intake_seq=intake.seq))
            log.warning(
                "item failed",
                extra={
                    "item_id": outcome.id,
                    "handler": intake.handler,
                    "error_code": outcome.error.code,
                    "attempts": outcome.attempts,
                },
            )
        if intake.seq is not None:
            error_seq = None if outcome.ok else intake.seq
            writes.append(
                self.sink.result(
                    event,
                    msg_id=result_msg_id(outcome.id, intake.handler, error_intake_seq=error_seq),
                    intake_seq=intake.seq,
                )
            )
        await asyncio.gather(*writes)
        self.metrics.outcome(event, (outcome.completed_at - outcome.received_at).total_seconds())
        if self.alerts is not None:
            self.alerts.outcome(ok=outcome.ok)
        if outcome.ok and log.isEnabledFor(logging.DEBUG):
            usage = outcome.usage
            log.debug(
                "item done",
                extra={
                    "item_id": outcome.id,
                    "handler": outcome.handler,
                    "route": outcome.route,
                    "attempts": outcome.attempts,
                    "input_tokens": usage.input_tokens if usage else None,
                    "output_tokens": usage.output_tokens if usage else None,
                    "cost_usd": outcome.cost_usd,
                },
            )
        return event

    async def _finish_bad(self, intake: Intake, exc: EnrichError) -> dict[str, Any]:
        item_id, metadata, source = salvage(intake.raw)
        item: Item | None = None
        try:  # keep the parsed item in the DLQ entry when only the template failed
            item = item_from_object(
                decode_object(intake.raw, max_bytes=self.config.max_item_bytes), intake.handler
            )
        except BadItemError:
            item = None
        if item is not None:
            item_id, metadata, source = item.id, item.metadata, item.source
        now = self.clock()
        spec = self.config.registry.get(intake.handler)
        outcome = Outcome(
            id=item_id,
            handler=intake.handler,
            route="sync",
            model=spec.model if spec else None,
            received_at=intake.received_at,
            completed_at=now,
            error=exc.info(),
            attempts=0,
            metadata=metadata,
            source=source,
        )
        return await self.finish(outcome, item=item, intake=intake)

    async def _answer_from_store(self, intake: Intake, item: Item, stored: StoredResult) -> dict[str, Any]:
        now = self.clock()
        event, msg_id, cached = stored_answer(
            stored.event,
            stored.intake_seq,
            intake_seq=intake.seq,
            metadata=item.metadata,
            source=item.source,
            received_at=intake.received_at,
            now=now,
        )
        if intake.seq is not None:  # the header names the intake message this answers
            await self.sink.result(event, msg_id=msg_id, intake_seq=intake.seq)
        if cached:
            self.counters.cached += 1
            self.metrics.outcome(event, (now - intake.received_at).total_seconds())
        return event

    async def _buffer(
        self, intake: Intake, item: Item, spec: HandlerSpec, decision: BatchRoute
    ) -> dict[str, Any] | None:
        """Buffer a batch-routed item (None), or end it as ``item_too_large`` when its
        buffer message would not fit a NATS message (its event)."""
        attributes = lambda: tracing.item_attributes(item.id, item.handler, model=spec.model)  # noqa: E731
        with tracing.span(self.tracer, "enrich.buffer", attributes):
            # The batch hop: the result span will continue this trace (see service/tracing.py).
            write = buffer_write(intake, item, decision, traceparent=tracing.current_traceparent())
            if len(write.payload) > self.config.max_message_bytes:
                return await self._finish_bad(intake, too_large_to_buffer(len(write.payload), self.config))
            [stored] = await self._store_buffered([write])
        if not stored:  # the source NAKs the intake message: it comes back later
            raise RuntimeError(f"buffer write for {item.handler}:{item.id} was not stored")
        return None


def too_large_to_buffer(size: int, config: PipelineConfig) -> BadItemError:
    return BadItemError(
        "item_too_large",
        f"item needs a {size}-byte buffer message; NATS takes at most {config.max_message_bytes} "
        f"(the server's max_payload less headers): send it on enrich.sync, or raise max_payload",
    )


def buffer_write(
    intake: Intake, item: Item, decision: BatchRoute, *, traceparent: str | None = None
) -> BufferWrite:
    """The buffer message of a batch-routed item; its Nats-Msg-Id makes a redelivered
    intake message's second write a duplicate JetStream drops."""
    record = buffer_record(intake, item, decision)
    if traceparent:
        record["traceparent"] = traceparent
    return BufferWrite(
        item.handler,
        decision.key.subject_token(),
        fastjson.dumps(record),
        f"{item.handler}:{item.id}:{intake.seq}",
    )


def buffer_record(intake: Intake, item: Item, decision: BatchRoute) -> dict[str, Any]:
    """What a batched item's buffer message holds: enough to send it in a batch and to
    answer it later without the intake message. The request body is not kept (it holds
    the text a second time): the flush builds it from the item (Batcher, encode_for_flush)."""
    return {
        "handler": item.handler,
        "item": item.to_dict(),
        "endpoint": decision.key.endpoint,
        "model": decision.key.model,
        "received_at": iso(intake.received_at),
        "intake_seq": intake.seq,
    }
