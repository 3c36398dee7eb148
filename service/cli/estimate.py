"""``enrichd estimate``: tokens and cost of enriching files, sync vs batch, computed
locally (tiktoken + the price table), without calling the provider."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from service.cli.submit import load_items
from service.core.cost import Usage, cost_usd, price_for
from service.core.errors import BadItemError
from service.core.items import item_from_object
from service.core.tokens import estimate_request_tokens
from service.settings import Settings


@dataclass(frozen=True)
class Estimate:
    handler: str
    model: str
    items: int
    bad_items: int
    input_tokens: int
    max_output_tokens: int
    sync_usd: float | None
    batch_usd: float | None

    def to_dict(self) -> dict[str, object]:
        return self.__dict__.copy()


def estimate(settings: Settings, handler: str, paths: list[Path]) -> Estimate:
    spec = settings.registry.get(handler)
    if spec is None:
        raise ValueError(f"no handler named {handler!r} (configured: {', '.join(sorted(settings.registry))})")
    records = load_items(handler, paths, None)
    input_tokens = output_tokens = bad = 0
    for record in records:
        try:
            item = item_from_object(record, handler)
            body = spec.build_body(item, max_tokens_param=settings.openai.max_tokens_param)
        except BadItemError:
            bad += 1
            continue
        input_tokens += estimate_request_tokens(body)
        output_tokens += 0 if spec.is_embedding else spec.max_output_tokens
    usage = Usage(input_tokens, output_tokens)
    price = price_for(spec.model, settings.price_table)
    return Estimate(
        handler=handler,
        model=spec.model,
        items=len(records) - bad,
        bad_items=bad,
        input_tokens=input_tokens,
        max_output_tokens=output_tokens,
        sync_usd=cost_usd(usage, price, route="sync", batch_discount=settings.batch_discount),
        batch_usd=cost_usd(usage, price, route="batch", batch_discount=settings.batch_discount),
    )
