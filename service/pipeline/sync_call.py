"""One item's provider call on the sync route: under the retry policy (one more try for
invalid output), inside the shared rate limit and the daily budget, traced per call."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from datetime import datetime
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind

from handlers import HandlerSpec
from service.core import retry as retry_core
from service.core.cost import Price, Usage, cost_usd, price_for
from service.core.errors import ErrorInfo, InvalidOutputError, ProviderError
from service.core.events import Outcome
from service.core.items import Item
from service.core.tokens import estimate_request_tokens
from service.observability import tracing
from service.observability.telemetry import Metrics
from service.pipeline.counters import Counters
from service.pipeline.ports import Alerts, Ledger, Limiter, Provider
from service.providers.openai_sync import ProviderResponse

log = logging.getLogger("enrichd.pipeline")


class SyncCall:
    """Runs provider calls for items; BudgetExhaustedError (from the ledger) is left to
    the caller, who decides between the batch route, an error and waiting."""

    def __init__(
        self,
        *,
        provider: Provider,
        retry: retry_core.RetryPolicy,
        prices: dict[str, Price],
        batch_discount: float,
        clock: Callable[[], datetime],
        rng: random.Random,
        counters: Counters,
        metrics: Metrics,
        tracer: trace.Tracer,
        limiter: Limiter | None = None,
        ledger: Ledger | None = None,
        alerts: Alerts | None = None,
        flex_timeout_s: float = 900.0,
        flex_lead_s: float = 930.0,
    ) -> None:
        self._flex_timeout_s = flex_timeout_s
        self._flex_lead_s = flex_lead_s
        self._provider = provider
        self._retry = retry
        self._prices = prices
        self._batch_discount = batch_discount
        self._clock = clock
        self._rng = rng
        self._counters = counters
        self._metrics = metrics
        self._tracer = tracer
        self._limiter = limiter
        self._ledger = ledger
        self._alerts = alerts

    async def run(
        self,
        spec: HandlerSpec,
        item: Item,
        body: dict[str, Any],
        *,
        received_at: datetime,
        route: str = "sync",
        parse: Callable[[dict[str, Any]], Any] | None = None,
    ) -> Outcome:
        """Call the provider under the retry policy; one retry for invalid output.

        ``route="flex"`` calls with ``service_tier: "flex"`` (and the flex timeout); a
        flex call that fails (refused with ``resource_unavailable``, timed out, ...) is
        tried on flex again while the deadline leaves room for a whole flex call and a
        sync fallback (``flex_lead_s``), then the item goes on the sync route with a fresh
        retry budget. The outcome names the route that answered. ``parse`` reads the
        response instead of ``spec.parse`` (a pack's answer: pipeline/packer.py)."""
        parse = parse or spec.parse
        policy = self._retry
        attempt, waits, calls = 1, 0, 0
        started = time.monotonic()
        # Retries stay within the item's deadline (when it was still ahead at the first
        # call: an item already late is still given the whole budget, and answered late).
        ahead = (item.deadline - self._clock()).total_seconds() if item.deadline is not None else None
        deadline_at = started + ahead if ahead is not None and ahead > 0 else None
        spent = Usage(0, 0)
        invalid_retried = False
        last_message: str | None = None
        while True:
            calls += 1
            if self._alerts is not None:
                self._alerts.call(retry=calls > 1)
            try:
                with tracing.span(
                    self._tracer,
                    "enrich.provider.call",
                    lambda n=calls: tracing.item_attributes(  # type: ignore[misc]
                        item.id, item.handler, model=spec.model, attempt=n
                    ),
                    kind=SpanKind.CLIENT,
                ):
                    response = await self._call(spec, item, body, route)
                spent = spent + response.usage
                result = parse(response.body)
                return self._outcome(
                    item,
                    received_at,
                    spec.model,
                    result=result,
                    attempts=calls,
                    usage=spent,
                    version=spec.version,
                    route=route,
                )
            except InvalidOutputError as exc:
                last_message = exc.message
                if exc.code == "invalid_output" and not invalid_retried:
                    invalid_retried = True
                    self._counters.retries += 1
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
                    version=spec.version,
                    route=route,
                )
            except ProviderError as exc:
                last_message = exc.message
                if route == "flex":
                    left = None if deadline_at is None else deadline_at - time.monotonic()
                    delay = retry_core.flex_retry_delay(
                        self._retry,
                        exc,
                        attempt=attempt,
                        left_s=left,
                        lead_s=self._flex_lead_s,
                        rng=self._rng,
                    )
                    self._counters.retries += 1
                    self._metrics.retries.add(1, {"handler": item.handler, "code": exc.code})
                    if delay is not None:
                        attempt += 1
                        log.info(
                            "flex call failed, retrying on flex",
                            extra={"item_id": item.id, "error_code": exc.code, "delay_s": round(delay, 3)},
                        )
                        await asyncio.sleep(delay)
                        continue
                    log.info(
                        "flex call failed, going sync",
                        extra={"item_id": item.id, "handler": item.handler, "error_code": exc.code},
                    )
                    route, attempt, waits, started = "sync", 1, 0, time.monotonic()
                    continue
                decision = retry_core.decide(
                    policy,
                    exc,
                    attempt=attempt,
                    rate_limit_waits=waits,
                    elapsed_s=time.monotonic() - started,
                    rng=self._rng,
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
                        version=spec.version,
                        route=route,
                    )
                if decision.counts_as_attempt:
                    attempt += 1
                else:
                    waits += 1
                self._counters.retries += 1
                self._metrics.retries.add(1, {"handler": item.handler, "code": exc.code})
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

    async def _call(
        self, spec: HandlerSpec, item: Item, body: dict[str, Any], route: str
    ) -> ProviderResponse:
        """One provider call inside the shared rate limit and the daily budget: both are
        reserved at the call's upper bound first and corrected from ``usage`` after."""
        ledger, limiter = self._ledger, self._limiter
        timeout_s: float | None = None
        if route == "flex":
            body, timeout_s = {**body, "service_tier": "flex"}, self._flex_timeout_s
        if ledger is None and limiter is None:  # nothing to reserve: skip tiktoken
            return await self._provider.call(spec.endpoint, body, timeout_s=timeout_s)
        prompt = estimate_request_tokens(body)
        max_out = 0 if spec.is_embedding else _max_output(spec, body)
        planned = prompt + max_out  # providers count the requested max output toward TPM
        price = price_for(spec.model, self._prices)
        ceiling = (
            cost_usd(Usage(prompt, max_out), price, route=route, batch_discount=self._batch_discount) or 0.0
        )
        day = await ledger.reserve(item.handler, route, ceiling) if ledger is not None else None
        if limiter is not None:
            waited = await limiter.acquire(spec.model, tokens=planned, urgent=item.priority == "urgent")
            if waited:
                self._metrics.rate_limit_wait.add(waited, {"model": spec.model})
        try:
            response = await self._provider.call(spec.endpoint, body, timeout_s=timeout_s)
        except BaseException:
            if ledger is not None and day is not None:
                await ledger.correct(day, item.handler, route, -ceiling)  # failed calls are not billed
            raise
        if limiter is not None:
            limiter.observe(spec.model, response.headers)
            actual = response.usage.input_tokens + max_out
            await limiter.settle(spec.model, estimated=planned, actual=actual)
        if ledger is not None and day is not None:
            real = cost_usd(response.usage, price, route=route, batch_discount=self._batch_discount) or 0.0
            await ledger.correct(day, item.handler, route, real - ceiling)
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
        version: str | None = None,
        route: str = "sync",
    ) -> Outcome:
        price = price_for(model, self._prices)
        return Outcome(
            id=item.id,
            handler=item.handler,
            route=route,
            model=model,
            received_at=received_at,
            completed_at=self._clock(),
            result=result,
            error=error,
            attempts=attempts,
            usage=usage,
            cost_usd=cost_usd(usage, price, route=route, batch_discount=self._batch_discount),
            metadata=item.metadata,
            source=item.source,
            last_message=last_message,
            handler_version=version,
        )


def _max_output(spec: HandlerSpec, body: dict[str, Any]) -> int:
    """The output tokens a request may use: what its body asks for (a pack asks for its
    items' together), else the handler's."""
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and value > 0:
            return value
    return spec.max_output_tokens
