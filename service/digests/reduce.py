"""Running a digest's handler on one window's group: one call when the members fit the
model's context, else hierarchically (the handler on chunks of members, then on the
chunks' answers, level by level until one call holds everything).

Every ``ok`` call is stored in the result store under a deterministic id
(core/digests.call_id) before the next one, so a crash or a lost lease during a long
reduction never pays a finished call again."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from handlers import HandlerSpec
from service.core import digests as core
from service.core.cost import Usage
from service.core.errors import ErrorInfo
from service.core.events import result_event
from service.core.items import Item
from service.core.tokens import count_tokens, estimate_request_tokens
from service.digests.ports import Caller, Store

log = logging.getLogger("enrichd.digests")


@dataclass(frozen=True)
class Reduced:
    """What the reduction of one group came to: the final answer or the error, and the
    sums over every call (stored calls count in ``calls`` and ``cached_calls``, and their
    usage and cost as first billed)."""

    result: Any = None
    error: ErrorInfo | None = None
    usage: Usage = Usage(0, 0)
    cost_usd: float = 0.0
    calls: int = 0
    cached_calls: int = 0
    levels: int = 0
    last_message: str | None = None


@dataclass(frozen=True)
class Window:
    digest: str
    start: datetime
    end: datetime
    group: str | None


class Reducer:
    def __init__(
        self,
        *,
        caller: Caller,
        store: Store,
        clock: Callable[[], datetime],
        max_tokens_param: str = "max_completion_tokens",
        count: Callable[[str], int] = count_tokens,
    ) -> None:
        self._caller = caller
        self._store = store
        self._clock = clock
        self._param = max_tokens_param
        self._count = count

    async def run(
        self, spec: HandlerSpec, window: Window, lines: Sequence[str], *, context_tokens: int
    ) -> Reduced:
        """Reduce ``lines`` (the members' lines) to one answer of ``spec``."""
        total = Reduced()
        covered = [1] * len(lines)  # how many members each line stands for
        current = list(lines)
        for level in range(core.MAX_LEVELS):
            budget = self._budget(spec, window, context_tokens)
            if budget < 16:
                return _failed(
                    total, "digest_context_too_small", "the prompt and answer leave no room for items"
                )
            current = [core.cut_line(line, budget - 1, self._count) for line in current]
            chunks = core.plan_chunks([self._count(line) + 1 for line in current], budget)
            if len(chunks) == 1:
                total, answer = await self._call(spec, window, level, 0, current, sum(covered), total)
                if answer is None:
                    return total
                return _with(total, result=answer, levels=level + 1)
            if level > 0 and len(chunks) >= len(current):
                return _failed(total, "digest_too_large", "the chunks' answers do not fit together any more")
            answers: list[str] = []
            sizes: list[int] = []
            for index, chunk in enumerate(chunks):
                n = sum(covered[i] for i in chunk)
                total, answer = await self._call(
                    spec, window, level, index, [current[i] for i in chunk], n, total
                )
                if answer is None:
                    return total
                answers.append(core.part_line(index, len(chunks), n, answer))
                sizes.append(n)
            current, covered = answers, sizes
        return _failed(total, "digest_too_large", f"still more than one call after {core.MAX_LEVELS} levels")

    def _budget(self, spec: HandlerSpec, window: Window, context_tokens: int) -> int:
        """Tokens left for the items in one call: the context less the prompt rendered
        without them, the answer and a margin (halved when the template names both
        ``{items}`` and ``{text}``: the items are then in the prompt twice)."""
        empty = self._item(spec, "probe", window, [], 10**9)
        body = spec.build_body(empty, max_tokens_param=self._param)
        left = context_tokens - estimate_request_tokens(body) - spec.max_output_tokens - core.MARGIN_TOKENS
        both = {"items", "text"} <= spec.template.fields
        return left // 2 if both else left

    def _item(
        self, spec: HandlerSpec, call_id: str, window: Window, lines: Sequence[str], count: int
    ) -> Item:
        fields = core.fields(lines, count=count, start=window.start, end=window.end, group=window.group)
        return Item(id=call_id, handler=spec.name, text=fields["items"] or " ", fields=fields)

    async def _call(
        self,
        spec: HandlerSpec,
        window: Window,
        level: int,
        index: int,
        lines: Sequence[str],
        count: int,
        total: Reduced,
    ) -> tuple[Reduced, Any]:
        """One call of the reduction (or its stored answer): the running totals, and the
        answer (None when the call failed; the totals then carry the error)."""
        call_id = core.call_id(window.digest, window.start, window.group, level, index)
        stored = await self._store.get(spec.name, call_id, version=spec.version)
        if stored is not None:
            event = stored.event
            usage = event.get("usage") or {}
            spent = Usage(
                int(usage.get("input_tokens", 0)),
                int(usage.get("output_tokens", 0)),
                int(usage.get("cached_tokens", 0)),
            )
            total = _with(
                total,
                usage=total.usage + spent,
                cost_usd=total.cost_usd + float(event.get("cost_usd") or 0.0),
                calls=total.calls + 1,
                cached_calls=total.cached_calls + 1,
            )
            return total, event.get("result")
        item = self._item(spec, call_id, window, lines, count)
        body = spec.build_body(item, max_tokens_param=self._param)
        outcome = await self._caller.run(spec, item, body, received_at=self._clock(), route="sync")
        total = _with(
            total,
            usage=total.usage + (outcome.usage or Usage(0, 0)),
            cost_usd=total.cost_usd + (outcome.cost_usd or 0.0),
            calls=total.calls + 1,
        )
        if not outcome.ok:
            return _with(total, error=outcome.error, last_message=outcome.last_message), None
        await self._store.put(result_event(outcome), intake_seq=None)
        log.debug(
            "digest call done",
            extra={"digest": window.digest, "call_id": call_id, "level": level, "lines": len(lines)},
        )
        return total, outcome.result


def _with(reduced: Reduced, **changes: Any) -> Reduced:
    return replace(reduced, **changes)


def _failed(total: Reduced, code: str, message: str) -> Reduced:
    return _with(total, error=ErrorInfo(code, message, False))
