"""The pipeline's configuration and clock: plain values built once from the settings
(service/wiring.py), read by the pipeline's parts."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from handlers import HandlerSpec
from service.core import retry as retry_core
from service.core.cost import Price
from service.core.events import DEFAULT_MAX_MESSAGE_BYTES
from service.core.pipelines import PipelineSpec
from service.core.routing import RoutingRules
from service.pipeline.packer import DEFAULT_LINGER_S, PackLimits


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
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    # Packing on the sync route (pipeline/packer.py): the limits a pack fits, the linger.
    pack_limits: PackLimits = PackLimits()
    pack_linger_s: float = DEFAULT_LINGER_S
    intake_prefix: str = "enrich.in."  # the intake subject of a handler is this + its name
    pipelines: dict[str, PipelineSpec] = field(default_factory=dict)  # CONTRACT §14


Clock = Callable[[], datetime]


def utcnow() -> datetime:
    return datetime.now(UTC)
