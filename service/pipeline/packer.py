"""Packing on the sync route (CONTRACT §12): urgent items of a handler with ``pack > 1``
that arrive together share one provider request.

The first item of a handler to arrive opens a pack and waits up to ``packing.linger_s``
(or until the pack is full) for others; then it sends the pack through
:class:`SyncCall` (retry policy, rate limit and budget apply to the pack request as to
any) and hands every member its answer. Each member's own ``process()`` call still
finishes its item (pipeline/finish.py) and returns its event, so the single flight per
(handler, id) and the ack discipline are unchanged. A member whose answer is missing or
invalid, or every member when the whole answer cannot be read, is sent alone by its own
call, with its share of the pack's usage (and calls) added to its own. The decisions
(keys, how many fit, reading the answer, shares) are pure: service/core/packing.py.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from handlers import HandlerSpec
from service.core import packing
from service.core.cost import Price, Usage, cost_usd, price_for
from service.core.errors import BadItemError, InvalidOutputError
from service.core.events import Outcome
from service.core.items import Item
from service.core.packing import PackBudget, PackLimits
from service.pipeline.sync_call import SyncCall
from service.state.budget import BudgetExhaustedError

log = logging.getLogger("enrichd.pipeline")

DEFAULT_LINGER_S = 0.03
_URGENCY = {"urgent": 0, "high": 1, "normal": 2, "low": 3}


@dataclass(frozen=True)
class Alone:
    """A member the pack did not answer: it is sent alone, carrying what the pack spent
    on it (its share of the usage, and the pack's calls)."""

    usage: Usage
    calls: int
    why: str
    route: str = "sync"  # the route that share was spent on (priced at it)


@dataclass
class _Member:
    item: Item
    body: dict[str, Any]
    received_at: datetime
    block: str
    tokens: int
    answer: asyncio.Future[Outcome | Alone]


@dataclass
class _Pack:
    budget: PackBudget
    members: list[_Member] = field(default_factory=list)
    ids: set[str] = field(default_factory=set)
    closed: asyncio.Event = field(default_factory=asyncio.Event)


class Packer:
    """The sync route's entry for a provider call: :meth:`run` answers one item, packed
    with others of its handler when the handler packs."""

    def __init__(
        self,
        sync_call: SyncCall,
        *,
        prices: dict[str, Price],
        batch_discount: float,
        limits: PackLimits | None = None,
        linger_s: float = DEFAULT_LINGER_S,
        max_tokens_param: str = "max_completion_tokens",
    ) -> None:
        self._sync = sync_call
        self._prices = prices
        self._batch_discount = batch_discount
        self._limits = limits or PackLimits()
        self._linger_s = linger_s
        self._max_tokens_param = max_tokens_param
        self._open: dict[tuple[str, str], _Pack] = {}  # (handler, route): the pack filling up
        self.packs_sent = 0

    async def run(
        self,
        spec: HandlerSpec,
        item: Item,
        body: dict[str, Any],
        *,
        received_at: datetime,
        packable: bool = True,
        route: str = "sync",
        steps: Mapping[str, Any] | None = None,
    ) -> Outcome:
        """The item's outcome (not yet finished: the caller writes its ending). Raises
        BudgetExhaustedError as SyncCall does, for the pack's request. ``steps``: a
        pipeline step's earlier results, which its prompt may show."""
        member = self._member(spec, item, body, received_at, steps) if packable and spec.pack > 1 else None
        if member is None:
            return await self._sync.run(spec, item, body, received_at=received_at, route=route)
        key = (spec.name, route)
        pack = self._open.get(key)
        if pack is not None and (item.id in pack.ids or not pack.budget.fits(member.tokens)):
            self._close(key, pack)  # full for this one: it goes out now, this item opens the next
            pack = None
        lead = pack is None
        if pack is None:
            pack = self._open[key] = _Pack(PackBudget(spec, self._limits))
        pack.members.append(member)
        pack.ids.add(item.id)
        pack.budget.add(member.tokens)
        if pack.budget.full:
            self._close(key, pack)
        if lead:
            await self._lead(spec, key, pack, route)
        answer = await member.answer
        if isinstance(answer, Outcome):
            return answer
        return await self._alone(spec, member, answer)

    def _member(
        self,
        spec: HandlerSpec,
        item: Item,
        body: dict[str, Any],
        received_at: datetime,
        steps: Mapping[str, Any] | None = None,
    ) -> _Member | None:
        try:
            block = packing.item_block(spec, item, steps)
        except BadItemError:
            return None
        if not packing.packable_block(block):
            return None
        tokens = packing.block_tokens(block)
        if not PackBudget(spec, self._limits).fits_with_another(tokens):
            return None
        future: asyncio.Future[Outcome | Alone] = asyncio.get_running_loop().create_future()
        return _Member(item, body, received_at, block, tokens, future)

    def _close(self, key: tuple[str, str], pack: _Pack) -> None:
        if self._open.get(key) is pack:
            del self._open[key]
        pack.closed.set()

    async def _lead(self, spec: HandlerSpec, key: tuple[str, str], pack: _Pack, route: str) -> None:
        """Wait for the pack to fill (or the linger to pass), then send it; every member's
        answer is set when this returns (also when it fails: the members' calls fail too,
        and their messages are redelivered)."""
        try:
            try:
                await asyncio.wait_for(pack.closed.wait(), timeout=self._linger_s)
            except TimeoutError:
                pass
            self._close(key, pack)
            await self._send(spec, pack.members, route)
        except BaseException as exc:
            for m in pack.members:
                if not m.answer.done():
                    m.answer.set_exception(
                        exc
                        if isinstance(exc, Exception)
                        else RuntimeError("the packed request was cancelled")
                    )
            if not isinstance(exc, Exception):
                raise

    async def _send(self, spec: HandlerSpec, members: list[_Member], route: str) -> None:
        if len(members) == 1:  # nothing arrived to share it with
            _set(members[0], Alone(Usage(0, 0), 0, "alone", route))
            return
        keys = packing.pack_keys([m.item.id for m in members])
        body = packing.build_pack_body(
            spec,
            [(k, m.block) for k, m in zip(keys, members, strict=True)],
            limits=self._limits,
            max_tokens_param=self._max_tokens_param,
        )
        first = members[0].item
        deadlines = [m.item.deadline for m in members if m.item.deadline is not None]
        # The pack as one item for the call: its logs, the limiter's urgency, the deadline
        # its retries stay within (the earliest of its members').
        lead = dataclasses.replace(
            first,
            id=f"pack:{first.id}+{len(members) - 1}",
            priority=min((m.item.priority for m in members), key=_URGENCY.__getitem__),
            deadline=min(deadlines) if deadlines else None,
        )
        self.packs_sent += 1
        try:
            outcome = await self._sync.run(
                spec,
                lead,
                body,
                received_at=min(m.received_at for m in members),
                route=route,
                parse=lambda response: packing.parse_pack(spec, response, keys),
            )
        except BudgetExhaustedError as exc:
            for m in members:
                _set_error(m, copy.copy(exc))
            return
        total = outcome.usage or Usage(0, 0)
        prompt_weights = [m.tokens for m in members]
        if not outcome.ok:
            shares = packing.share_usage(total, prompt_weights)
            error = outcome.error
            assert error is not None
            for m, share in zip(members, shares, strict=True):
                if error.retryable:  # the provider kept failing (rate limit, 5xx): as one item would end
                    _set(m, self._member_outcome(spec, m, outcome, share, len(members)))
                else:  # refused, cut off, unreadable, rejected: each item alone
                    _set(m, Alone(share, outcome.attempts, error.code, outcome.route))
            if not error.retryable:
                log.info(
                    "packed answer unusable; sending its items alone",
                    extra={"handler": spec.name, "items": len(members), "error_code": error.code},
                )
            return
        answers: dict[str, Any] = outcome.result
        ordered = [answers[k] for k in keys]
        shares = packing.share_usage(total, prompt_weights, packing.output_weights(ordered))
        alone = 0
        for m, answer, share in zip(members, ordered, shares, strict=True):
            if isinstance(answer, InvalidOutputError):
                alone += 1
                _set(m, Alone(share, outcome.attempts, answer.message, outcome.route))
            else:
                _set(m, self._member_outcome(spec, m, outcome, share, len(members), result=answer))
        if alone:
            log.info(
                "items missing or invalid in a packed answer; sending them alone",
                extra={"handler": spec.name, "items": len(members), "alone": alone},
            )

    def _member_outcome(
        self, spec: HandlerSpec, m: _Member, pack: Outcome, share: Usage, n: int, *, result: Any = None
    ) -> Outcome:
        return Outcome(
            id=m.item.id,
            handler=m.item.handler,
            route=pack.route,
            model=pack.model,
            received_at=m.received_at,
            completed_at=pack.completed_at,
            result=result if pack.ok else None,
            error=pack.error,
            attempts=pack.attempts,
            usage=share,
            cost_usd=self._cost(share, spec.model, pack.route),
            metadata=m.item.metadata,
            source=m.item.source,
            last_message=pack.last_message,
            handler_version=spec.version,
            packed=n,
        )

    async def _alone(self, spec: HandlerSpec, m: _Member, carried: Alone) -> Outcome:
        """An item the pack did not answer, sent alone (``packed`` 1) on the route that
        answered the pack (a flex pack that fell back to sync: sync); its usage, cost and
        attempts include what the pack spent on it."""
        outcome = await self._sync.run(spec, m.item, m.body, received_at=m.received_at, route=carried.route)
        if not carried.calls and not carried.usage.input_tokens and not carried.usage.output_tokens:
            return outcome
        usage = (outcome.usage or Usage(0, 0)) + carried.usage
        share_cost = self._cost(carried.usage, spec.model, carried.route)
        cost = (
            None
            if outcome.cost_usd is None or share_cost is None
            else round(outcome.cost_usd + share_cost, 10)
        )
        return dataclasses.replace(
            outcome, usage=usage, cost_usd=cost, attempts=outcome.attempts + carried.calls
        )

    def _cost(self, usage: Usage, model: str, route: str) -> float | None:
        return cost_usd(
            usage, price_for(model, self._prices), route=route, batch_discount=self._batch_discount
        )


def _set(member: _Member, answer: Outcome | Alone) -> None:
    if not member.answer.done():
        member.answer.set_result(answer)


def _set_error(member: _Member, exc: BaseException) -> None:
    if not member.answer.done():
        member.answer.set_exception(exc)


__all__ = ["DEFAULT_LINGER_S", "Alone", "PackLimits", "Packer"]
