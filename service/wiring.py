"""Builders for the composition root: each turns settings into one complete part (the
provider, the pipeline's config, the batch path, the shared limiter and ledger). No part
is changed after it is built; ``service.app`` calls these in order and owns what they
return (its tasks, its shutdown)."""

from __future__ import annotations

import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.js import JetStreamContext
from opentelemetry import trace

from service.batch.batcher import Batcher
from service.batch.ports import Promotions
from service.contract.subjects import Subjects
from service.core.alerts import AlertRules
from service.core.batching import BatchPolicy, Window
from service.core.budget import Caps
from service.core.events import HEADER_ROOM
from service.core.packing import PackLimits
from service.core.ratelimit import Limits
from service.core.redact import Redactor
from service.core.retry import RetryPolicy
from service.core.routing import RoutingRules
from service.core.schedules import longest_window_s
from service.digests.reduce import Reducer
from service.digests.runner import Digests, reader
from service.observability import telemetry
from service.observability.alerts import Alerter
from service.observability.telemetry import Metrics
from service.pipeline.config import Clock, PipelineConfig
from service.pipeline.process import Pipeline
from service.pipeline.sync_call import SyncCall
from service.providers.openai_batch import OpenAIBatchProvider
from service.providers.openai_sync import OpenAISyncProvider
from service.settings import Settings
from service.sinks.events import EventSink
from service.state.batches import BatchStore
from service.state.budget import Ledger
from service.state.digests import DigestBook
from service.state.limits import SharedLimiter
from service.state.promoted import PromotedMarks
from service.state.results import ResultStore
from service.state.stats import DailyStats, HandlerFacts
from service.state.streams import keep_at_least

log = logging.getLogger("enrichd")


@dataclass
class ProviderStart:
    """The sync provider client, and the built-in emulator when it was started for it."""

    client: OpenAISyncProvider
    url: str | None
    emulator: Any = None


async def start_provider(s: Settings) -> ProviderStart:
    """The OpenAI client; with no key and no base URL, the built-in emulator first (with
    a warning that its results are synthetic)."""
    url = s.openai.base_url
    api_key = s.openai.api_key.get_secret_value() if s.openai.api_key else None
    emulator: Any = None
    if s.openai.use_emulator:
        # Imported here: the emulator is only loaded when it is used (it is not an arrow
        # any part of the daemon depends on).
        from service.emulator import Emulator, EmulatorConfig

        emulator = Emulator(EmulatorConfig(batch_delay_s=s.emulator.batch_delay_s))
        url = await emulator.start(host=s.emulator.host, port=s.emulator.port)
        api_key = "emulator"
        log.warning(
            "no openai.api_key or openai.base_url configured: using the built-in emulator, "
            "results are SYNTHETIC",
            extra={"emulator_url": url},
        )
    client = OpenAISyncProvider(
        base_url=url,
        api_key=api_key,
        timeout_s=s.openai.timeout_s,
        max_concurrency=s.openai.max_concurrency,
        organization=s.openai.organization,
        project=s.openai.project,
    )
    return ProviderStart(client=client, url=url, emulator=emulator)


def item_limits(s: Settings, max_payload: int) -> tuple[int, int]:
    """(largest message, largest item): every message the daemon writes for an item must
    fit the server's max_payload (less room for headers); the accepted item size is
    bounded by it too."""
    max_message = max_payload - HEADER_ROOM
    max_item = min(s.limits.max_item_bytes, max_message)
    if max_item < s.limits.max_item_bytes:
        log.info(
            "items are limited by the NATS server's max_payload",
            extra={"max_item_bytes": max_item, "configured": s.limits.max_item_bytes},
        )
    return max_message, max_item


def alerter(s: Settings, sink: EventSink) -> Alerter:
    a = s.alerts
    rules = AlertRules(a.failure_rate, a.retry_budget, a.window_s, a.min_items, a.batch_sla_s, a.cooldown_s)
    return Alerter(rules, sink, instance=s.instance)


async def open_ledger(
    js: JetStreamContext,
    s: Settings,
    subjects: Subjects,
    *,
    clock: Clock,
    on_exceeded: Callable[[str, str, float, float], Awaitable[None]],
) -> Ledger | None:
    """The shared spend ledger, when a budget is configured."""
    if s.budget.daily_usd is None and not s.budget.handlers:
        return None
    return await Ledger.open(
        js,
        f"{subjects.stream_suffix}_BUDGET",
        Caps(s.budget.daily_usd, dict(s.budget.handlers)),
        replicas=s.nats.stream_replicas,
        clock=clock,
        on_exceeded=on_exceeded,
    )


async def open_limiter(js: JetStreamContext, s: Settings, subjects: Subjects) -> SharedLimiter | None:
    """The rate limiter shared by every replica, when limits are configured."""
    if not s.rate_limits:
        return None
    limits = {
        model: Limits(
            rpm=cfg.rpm,
            tpm=cfg.tpm,
            urgent_reserve=s.rate_limit_urgent_reserve,
            burst_s=cfg.burst_s,
            headroom=cfg.headroom,
        )
        for model, cfg in s.rate_limits.items()
    }
    return await SharedLimiter.open(
        js, f"{subjects.stream_suffix}_LIMITS", limits, replicas=s.nats.stream_replicas
    )


async def open_stats(js: JetStreamContext, s: Settings, subjects: Subjects, *, clock: Clock) -> DailyStats:
    """Today's tallies, with what the estimate expects of each configured handler."""
    return await DailyStats.open(
        js,
        subjects.stream_suffix,
        s.instance,
        replicas=s.nats.stream_replicas,
        clock=clock,
        facts={name: HandlerFacts(h.max_output_tokens, h.is_embedding) for name, h in s.registry.items()},
        prices=s.price_table,
        batch_discount=s.batch_discount,
    )


async def open_marks(js: JetStreamContext, s: Settings, subjects: Subjects) -> PromotedMarks:
    """Marks of promoted items, kept past any batch such an item could still be in."""
    ttl_s = s.batching.max_latency_s + 2 * 86_400
    return await PromotedMarks.open(js, subjects.stream_suffix, replicas=s.nats.stream_replicas, ttl_s=ttl_s)


def routing_rules(s: Settings) -> RoutingRules:
    return RoutingRules(
        sync_priorities=frozenset(s.routing.sync_priorities),
        max_latency_s=s.batching.max_latency_s,
        flex=s.routing.flex,
        flex_timeout_s=s.routing.flex_timeout_s,
        promote_margin_s=s.routing.promote_margin_s,
    )


def pipeline_config(
    s: Settings, *, max_item_bytes: int, max_message_bytes: int, intake_prefix: str
) -> PipelineConfig:
    return PipelineConfig(
        registry=s.registry,
        rules=routing_rules(s),
        retry=RetryPolicy(
            max_attempts=s.retry.max_attempts,
            base_s=s.retry.base_s,
            max_backoff_s=s.retry.max_backoff_s,
            max_elapsed_s=s.retry.max_elapsed_s,
        ),
        prices=s.price_table,
        batch_discount=s.batch_discount,
        max_item_bytes=max_item_bytes,
        max_tokens_param=s.openai.max_tokens_param,
        max_message_bytes=max_message_bytes,
        pack_limits=pack_limits(s),
        pack_linger_s=s.packing.linger_s,
        intake_prefix=intake_prefix,
        pipelines=s.pipeline_specs,
    )


def pack_limits(s: Settings) -> PackLimits:
    return PackLimits(context_tokens=s.packing.context_tokens, max_output_tokens=s.packing.max_output_tokens)


async def build_batcher(
    js: JetStreamContext,
    s: Settings,
    subjects: Subjects,
    *,
    provider: OpenAISyncProvider,
    results: ResultStore,
    sink: EventSink,
    redact: Redactor,
    metrics: Metrics,
    alerts: Alerter,
    tracer: trace.Tracer,
    ledger: Ledger | None,
    clock: Clock,
    max_message_bytes: int,
    promotions: Promotions | None,
) -> Batcher:
    """The batch path, on the same provider account and stores as the sync route. Its
    calendar is the daemon's clock; ages and leases stay on the host's clock."""
    b = s.batching
    return Batcher(
        js=js,
        subjects=subjects,
        store=await BatchStore.open(js, subjects.stream_suffix, replicas=s.nats.stream_replicas),
        results=results,
        sink=sink,
        redact=redact,
        provider=OpenAIBatchProvider(provider.client),
        registry=s.registry,
        pipelines=s.pipeline_specs,
        policy=BatchPolicy(
            max_items=b.max_items,
            max_bytes=b.max_bytes,
            max_wait_s=b.max_wait_s,
            windows=tuple(Window.parse(w) for w in b.windows),
        ),
        poll_interval_s=b.poll_interval_s,
        max_attempts=s.retry.max_attempts,
        max_enqueued_tokens=b.max_enqueued_tokens,
        prices=s.price_table,
        batch_discount=s.batch_discount,
        instance_id=s.instance,
        consumer=s.nats.consumer,
        results_chunk=b.results_chunk,
        flush_ack_wait_s=b.flush_ack_wait_s,
        lease_s=b.lease_s,
        max_tokens_param=s.openai.max_tokens_param,
        pack_limits=pack_limits(s),
        max_message_bytes=max_message_bytes,
        give_up_after_s=b.give_up_after_s,
        metrics=metrics,
        alerts=alerts,
        tracer=tracer,
        ledger=ledger,
        budget_recheck_s=s.budget.recheck_s,
        calendar=clock,
        promotions=promotions,
    )


async def build_digests(
    js: JetStreamContext,
    s: Settings,
    subjects: Subjects,
    pipeline: Pipeline,
    provider: OpenAISyncProvider,
    limiter: SharedLimiter | None,
    sink: EventSink,
    metrics: Metrics,
    alerts: Alerter,
) -> Digests | None:
    """The digest flow (CONTRACT §15), when digests are configured. Its calls go through
    a SyncCall like the sync route's, on the same provider, shared limiter, ledger and
    counters (the pipeline's own is private to it). The OUT stream is made to keep events
    at least twice the longest window, so a window's members are still there at its end."""
    digests = s.digest_specs
    if not digests:
        return None
    now = pipeline.clock()
    longest = max(longest_window_s(spec.schedule, now) for spec in digests.specs)
    await keep_at_least(js, subjects.stream("OUT"), 2 * longest + 2 * digests.grace_s)
    caller = SyncCall(
        provider=provider,
        retry=pipeline.config.retry,
        prices=s.price_table,
        batch_discount=s.batch_discount,
        clock=pipeline.clock,
        rng=random.Random(),
        counters=pipeline.counters,
        metrics=metrics,
        tracer=pipeline.tracer,
        limiter=limiter,
        ledger=pipeline.ledger,
        alerts=alerts,
    )
    reducer = Reducer(
        caller=caller, store=pipeline.store, clock=pipeline.clock, max_tokens_param=s.openai.max_tokens_param
    )
    flow = Digests(
        digests,
        read=reader(js, subjects),
        book=await DigestBook.open(js, subjects.stream_suffix, replicas=s.nats.stream_replicas),
        reducer=reducer,
        sink=sink,
        subjects=subjects,
        registry=s.registry,
        metrics=metrics,
        clock=pipeline.clock,
        instance=s.instance,
        context_tokens=s.packing.context_tokens,
        budget_recheck_s=s.budget.recheck_s,
    )
    telemetry.register_digest_gauges(metrics, lambda: flow.open_windows)
    return flow
