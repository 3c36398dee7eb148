"""A flush's spend: cut it to today's budget, reserve its upper bound before it is
written, and swap the reservation for what the provider billed once it is published."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from handlers import HandlerSpec
from service.core.batch_outcomes import Action
from service.core.cost import Price, Usage, cost_usd, price_for
from service.core.flush_plan import budget_cut
from service.state.batches import BatchRecord
from service.state.budget import BudgetExhaustedError, Ledger


class Spend:
    """Budget arithmetic of the batch route over the shared :class:`Ledger` (none: no
    caps, every method lets the flush through and reserves nothing)."""

    def __init__(
        self,
        *,
        ledger: Ledger | None,
        registry: Mapping[str, HandlerSpec],
        prices: dict[str, Price],
        batch_discount: float,
        recheck_s: float = 60.0,
    ) -> None:
        self.ledger = ledger
        self.registry = registry
        self.prices = prices
        self.batch_discount = batch_discount
        self.recheck_s = recheck_s  # how long a buffer the budget turned away waits

    def ceiling_usd(self, record: dict[str, Any], prompt_tokens: int) -> float:
        """Upper bound of one request's batch cost: prompt + max output tokens."""
        spec = self.registry.get(record["handler"])
        max_out = 0 if spec is None or spec.is_embedding else spec.max_output_tokens
        price = price_for(record["model"], self.prices)
        usage = Usage(prompt_tokens, max_out)
        return cost_usd(usage, price, route="batch", batch_discount=self.batch_discount) or 0.0

    async def within_budget(self, records: list[dict[str, Any]], tokens: list[int], n: int) -> int:
        """Cut the flush to what today's budget can still pay for (0: nothing fits)."""
        if self.ledger is None:
            return n
        room: dict[str, float | None] = {}
        costs: list[tuple[str, float]] = []
        for index in range(n):
            handler = records[index]["handler"]
            if handler not in room:
                room[handler] = await self.ledger.remaining(handler)
            costs.append((handler, self.ceiling_usd(records[index], tokens[index])))
        return budget_cut(costs, room)

    async def reserve(self, records: list[dict[str, Any]], tokens: list[int]) -> tuple[str | None, float]:
        """Reserve the flush's cost at its upper bound (prompt + max output, batch price)."""
        if self.ledger is None:
            return None, 0.0
        total = 0.0
        by_handler: dict[str, float] = {}
        for record, prompt in zip(records, tokens, strict=True):
            usd = self.ceiling_usd(record, prompt)
            by_handler[record["handler"]] = by_handler.get(record["handler"], 0.0) + usd
            total += usd
        day: str | None = None
        done: list[tuple[str, float]] = []
        try:
            for handler, usd in by_handler.items():
                day = await self.ledger.reserve(handler, "batch", usd)
                done.append((handler, usd))
        except BudgetExhaustedError:
            for handler, usd in done:
                await self.ledger.correct(day or "", handler, "batch", -usd)
            raise
        return day, total

    def owes(self, record: BatchRecord) -> bool:
        """The flush holds a reservation to settle."""
        return self.ledger is not None and bool(record.budget_day)

    async def settle(self, record: BatchRecord, items: list[dict[str, Any]], actions: list[Action]) -> None:
        """Swap the flush's reservation for what the provider billed (lines that ran)."""
        assert self.ledger is not None and record.budget_day is not None
        price = price_for(record.model, self.prices)
        billed: dict[str, float] = {}
        for item, action in zip(items, actions, strict=True):
            usage = action.usage  # a retried pack member's share was billed too
            usd = cost_usd(usage, price, route="batch", batch_discount=self.batch_discount) or 0.0
            billed[item["handler"]] = billed.get(item["handler"], 0.0) + usd
        reserved_share = record.reserved_usd / max(1, len(items))
        for handler, usd in billed.items():
            count = sum(1 for it in items if it["handler"] == handler)
            await self.ledger.correct(record.budget_day, handler, "batch", usd - reserved_share * count)
