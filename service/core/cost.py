"""Cost arithmetic from a per-model price table (USD per million tokens). Pure."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Price:
    input_per_mtok: float
    output_per_mtok: float = 0.0


@dataclass(frozen=True)
class Usage:
    input_tokens: int
    output_tokens: int

    def to_dict(self) -> dict[str, int]:
        return {"input_tokens": self.input_tokens, "output_tokens": self.output_tokens}


def price_for(model: str, table: dict[str, Price]) -> Price | None:
    """Exact name first, then the longest table key that prefixes the model
    (``gpt-4o-mini-2024-07-18`` → ``gpt-4o-mini``)."""
    if model in table:
        return table[model]
    matches = [key for key in table if model.startswith(key)]
    return table[max(matches, key=len)] if matches else None


def cost_usd(usage: Usage, price: Price | None, *, route: str, batch_discount: float) -> float | None:
    """Cost of one request; ``None`` when the model has no price in the table."""
    if price is None:
        return None
    total = (usage.input_tokens * price.input_per_mtok + usage.output_tokens * price.output_per_mtok) / 1e6
    if route == "batch":
        total *= 1.0 - batch_discount
    return round(total, 10)
