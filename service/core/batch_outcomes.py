"""Turning a finished provider batch into one action per item, pure: an ok result, an
error (also dead-lettered), or a retry in a later batch. Decided from the batch status,
its validation errors and the mapped output/error lines."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from handlers import HandlerSpec
from service.core import packing
from service.core.batch_info import BatchInfo
from service.core.batchfile import LineFailed, LineOk, LineOutcome
from service.core.cost import Usage, usage_from_openai
from service.core.errors import EnrichError, ErrorInfo, InvalidOutputError


@dataclass(frozen=True)
class Ok:
    result: Any
    usage: Usage
    packed: int = 1  # how many items shared the request (CONTRACT §12)


@dataclass(frozen=True)
class Fail:
    error: ErrorInfo
    usage: Usage
    last_message: str | None = None
    packed: int = 1


@dataclass(frozen=True)
class Retry:
    """Into a later batch. ``unpacked``: its pack did not answer it, it goes alone.
    ``usage``: what this batch spent on it (its share of a pack), carried to its event."""

    reason: str
    unpacked: bool = False
    usage: Usage = Usage(0, 0)


Action = Ok | Fail | Retry


def _usage(body: dict[str, Any]) -> Usage:
    return usage_from_openai(body.get("usage"))


def line_numbers(items: list[dict[str, Any]]) -> list[int]:
    """The batch file line (0-based) of each flush item: one line per item, and one per
    pack, at its first member (service/core/flush_plan.py pack_lines)."""
    out: list[int] = []
    packs: dict[str, int] = {}
    lines = 0
    for item in items:
        pack = item.get("pack")
        if pack is not None and pack in packs:
            out.append(packs[pack])
            continue
        if pack is not None:
            packs[pack] = lines
        out.append(lines)
        lines += 1
    return out


def failed_batch_actions(info: BatchInfo, count: int, lines: list[int] | None = None) -> list[Action]:
    """A batch that failed validation: lines the provider names are bad for good (every
    item of a pack on such a line); the rest never ran and are retried. ``lines``: each
    item's line (default: item i on line i)."""
    lines = lines if lines is not None else list(range(count))
    bad: dict[int, str] = {}
    for e in info.errors:
        if e.line is not None and 1 <= e.line <= count:
            bad[e.line - 1] = f"{e.code}: {e.message}"
    summary = "; ".join(f"{e.code}: {e.message}" for e in info.errors[:3]) or "batch failed validation"
    actions: list[Action] = []
    for index in lines:
        if index in bad:
            actions.append(
                Fail(
                    ErrorInfo("bad_request", f"rejected by batch validation: {bad[index]}", False),
                    Usage(0, 0),
                    bad[index],
                )
            )
        else:
            actions.append(Retry(f"batch failed: {summary}"))
    return actions


def line_action(
    spec: HandlerSpec | None, outcome: LineOutcome | None, *, status: str, attempts: int, max_attempts: int
) -> Action:
    """One item of a completed, expired or cancelled batch."""
    if spec is None:
        return Fail(
            ErrorInfo("unknown_handler", "the handler was removed from the configuration", False), Usage(0, 0)
        )
    if isinstance(outcome, LineOk):
        usage = _usage(outcome.body)
        try:
            return Ok(spec.parse(outcome.body), usage)
        except InvalidOutputError as exc:
            if exc.code == "invalid_output" and attempts < 2:
                return Retry("invalid output")
            return Fail(exc.info(), usage, exc.message)
    if status == "cancelled" and (outcome is None or outcome.error.retryable):
        # The operator (or provider) cancelled the batch: requests that did not run end here.
        return Fail(
            ErrorInfo("batch_cancelled", "the batch was cancelled before this request ran", True), Usage(0, 0)
        )
    if outcome is None:
        error: EnrichError = EnrichError(
            "provider_error", f"no result line for this request ({status})", retryable=True
        )
    else:
        assert isinstance(outcome, LineFailed)
        error = outcome.error
    if error.retryable and attempts < max_attempts:
        return Retry(error.code)
    info = error.info()
    if error.retryable:
        info = ErrorInfo(error.code, f"gave up after {attempts} batches: {error.message}", True)
    return Fail(info, Usage(0, 0), error.message)


def pack_actions(
    spec: HandlerSpec | None,
    members: list[dict[str, Any]],
    outcome: LineOutcome | None,
    *,
    status: str,
    max_attempts: int,
) -> list[Action]:
    """The members of one pack line (in flush order). An answered member is Ok with its
    share of the line's usage and ``packed``; a member missing or invalid in the answer,
    or every member when the answer cannot be read or the provider rejected the request
    (4xx), is retried alone (``unpacked``), carrying its share. A line that did not run
    (5xx, expired, no line) is, for each member, what it would be for a single item: its
    members may share a pack again."""
    attempts = [int(m.get("batch_attempts", 0)) + 1 for m in members]
    if spec is None or not isinstance(outcome, LineOk):
        if isinstance(outcome, LineFailed) and not outcome.error.retryable and spec is not None:
            return [
                _alone(a, max_attempts, outcome.error.info(), Usage(0, 0), len(members)) for a in attempts
            ]
        return [
            line_action(spec, outcome, status=status, attempts=a, max_attempts=max_attempts) for a in attempts
        ]
    total = _usage(outcome.body)
    weights = [max(1, int(m.get("pack_weight") or 1)) for m in members]
    n = len(members)
    try:
        answers = packing.parse_pack(spec, outcome.body, [str(m.get("pack_key")) for m in members])
    except InvalidOutputError as exc:
        shares = packing.share_usage(total, weights)
        return [
            _alone(a, max_attempts, exc.info(), share, n) for a, share in zip(attempts, shares, strict=True)
        ]
    ordered = [answers[str(m.get("pack_key"))] for m in members]
    shares = packing.share_usage(total, weights, packing.output_weights(ordered))
    actions: list[Action] = []
    for answer, share, a in zip(ordered, shares, attempts, strict=True):
        if isinstance(answer, InvalidOutputError):
            actions.append(_alone(a, max_attempts, answer.info(), share, n))
        else:
            actions.append(Ok(answer, share, packed=n))
    return actions


def _alone(attempts: int, max_attempts: int, error: ErrorInfo, share: Usage, n: int) -> Action:
    """A pack member its pack did not answer: into a later batch alone, while attempts last."""
    if attempts < max_attempts:
        return Retry(f"unpacked: {error.code}", unpacked=True, usage=share)
    return Fail(error, share, error.message, packed=n)


class ActionCollector:
    """Turns output/error lines into per-item actions as they are read, so the response
    bodies of a large batch are never all held at once. A success wins over an error
    line for the same request. A pack's line (its ``custom_id`` is the pack's) gives an
    action to each of its members."""

    def __init__(
        self, items: list[dict[str, Any]], registry: dict[str, HandlerSpec], *, status: str, max_attempts: int
    ) -> None:
        self._items = items
        self._registry = registry
        self._status = status
        self._max_attempts = max_attempts
        self._index: dict[str, list[int]] = {}
        for i, item in enumerate(items):
            self._index.setdefault(item.get("pack") or item["cid"], []).append(i)
        self._actions: list[Action | None] = [None] * len(items)

    def _action(self, item: dict[str, Any], outcome: LineOutcome | None) -> Action:
        return line_action(
            self._registry.get(item["handler"]),
            outcome,
            status=self._status,
            attempts=int(item.get("batch_attempts", 0)) + 1,
            max_attempts=self._max_attempts,
        )

    def _line(self, indices: list[int], outcome: LineOutcome | None) -> list[Action]:
        first = self._items[indices[0]]
        if "pack" not in first:
            return [self._action(first, outcome)]
        return pack_actions(
            self._registry.get(first["handler"]),
            [self._items[i] for i in indices],
            outcome,
            status=self._status,
            max_attempts=self._max_attempts,
        )

    def add(self, lines: Iterable[tuple[str, LineOutcome]]) -> None:
        for cid, outcome in lines:
            indices = self._index.get(cid)
            if indices is None:
                continue  # not ours (or a line repeated by the provider)
            for index, action in zip(indices, self._line(indices, outcome), strict=True):
                if self._actions[index] is None or isinstance(action, Ok):
                    self._actions[index] = action

    def result(self) -> list[Action]:
        for indices in self._index.values():
            if any(self._actions[i] is None for i in indices):
                for index, action in zip(indices, self._line(indices, None), strict=True):
                    if self._actions[index] is None:
                        self._actions[index] = action
        return [action for action in self._actions if action is not None]


def completed_batch_actions(
    items: list[dict[str, Any]],
    lines: dict[str, LineOutcome],
    registry: dict[str, HandlerSpec],
    *,
    status: str,
    max_attempts: int,
) -> list[Action]:
    collector = ActionCollector(items, registry, status=status, max_attempts=max_attempts)
    collector.add(lines.items())
    return collector.result()
