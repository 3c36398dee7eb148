"""Cost arithmetic from a per-model price table (USD per million tokens). Pure.

Routes priced at a discount: ``batch`` (the Batch API) and ``flex`` (OpenAI's flex
processing, billed at Batch API rates). Input tokens served from the provider's prompt
cache (``usage.prompt_tokens_details.cached_tokens``) are priced at the model's cached
rate when the table has one."""

from __future__ import annotations

from dataclasses import dataclass

DISCOUNTED_ROUTES = frozenset({"batch", "flex"})


@dataclass(frozen=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float = 0.0
    cached_input_per_mtok: float | None = None  # None: cached input costs as much as input
    flex: bool = False  # the model can be called with service_tier "flex"


@dataclass(frozen=True)
class Usage:
    """Tokens of one request (or one item's share of it). ``cached_tokens`` is the part
    of ``input_tokens`` the provider read from its prompt cache."""

    input_tokens: int
    output_tokens: int
    cached_tokens: int = 0

    def to_dict(self) -> dict[str, int]:
        out = {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}
        if self.cached_tokens:
            out["cached_tokens"] = self.cached_tokens
        return out

    def __add__(self, other: Usage) -> Usage:
        return Usage(
            self.input_tokens + other.input_tokens,
            self.output_tokens + other.output_tokens,
            self.cached_tokens + other.cached_tokens,
        )


def usage_from_openai(usage: dict[str, object] | None) -> Usage:
    """``usage`` of a chat completion, embeddings or batch output body."""
    if not isinstance(usage, dict):
        return Usage(0, 0)
    details = usage.get("prompt_tokens_details")
    cached = details.get("cached_tokens") if isinstance(details, dict) else 0
    return Usage(_count(usage.get("prompt_tokens")), _count(usage.get("completion_tokens")), _count(cached))


def _count(value: object) -> int:
    return value if isinstance(value, int) and value > 0 else 0


def split_usage(total: Usage, weights: list[int]) -> list[Usage]:
    """Shares of one request's usage for the items that shared it (a pack), in proportion
    to ``weights`` (e.g. each item's prompt tokens); the shares add up to ``total`` exactly."""
    return [
        Usage(i, o, c)
        for i, o, c in zip(
            _shares(total.input_tokens, weights),
            _shares(total.output_tokens, weights),
            _shares(total.cached_tokens, weights),
            strict=True,
        )
    ]


def _shares(amount: int, weights: list[int]) -> list[int]:
    if not weights:
        return []
    weights = [max(w, 1) for w in weights]
    whole = sum(weights)
    shares = [amount * w // whole for w in weights]
    # largest remainders get the tokens integer division left over
    order = sorted(range(len(weights)), key=lambda k: (-(amount * weights[k] % whole), k))
    for k in order[: amount - sum(shares)]:
        shares[k] += 1
    return shares


def price_for(model: str, table: dict[str, Price]) -> Price | None:
    """Exact name first, then the longest table key that prefixes the model
    (``gpt-4o-mini-2024-07-18`` → ``gpt-4o-mini``)."""
    if model in table:
        return table[model]
    matches = [key for key in table if model.startswith(key)]
    return table[max(matches, key=len)] if matches else None


def supports_flex(model: str, table: dict[str, Price]) -> bool:
    price = price_for(model, table)
    return price is not None and price.flex


def cost_usd(usage: Usage, price: Price | None, *, route: str, batch_discount: float) -> float | None:
    """Cost of one request; ``None`` when the model has no price in the table."""
    if price is None:
        return None
    cached = min(usage.cached_tokens, usage.input_tokens)
    cached_rate = price.input_per_mtok if price.cached_input_per_mtok is None else price.cached_input_per_mtok
    total = (
        (usage.input_tokens - cached) * price.input_per_mtok
        + cached * cached_rate
        + usage.output_tokens * price.output_per_mtok
    ) / 1e6
    if route in DISCOUNTED_ROUTES:
        total *= 1.0 - batch_discount
    return round(total, 10)
