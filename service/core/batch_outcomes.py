"""Turning a finished provider batch into one action per item, pure: an ok result, an
error (also dead-lettered), or a retry in a later batch. Decided from the batch status,
its validation errors and the mapped output/error lines."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from handlers import HandlerSpec
from service.core.batch_info import BatchInfo
from service.core.batchfile import LineFailed, LineOk, LineOutcome
from service.core.cost import Usage, usage_from_openai
from service.core.errors import EnrichError, ErrorInfo, InvalidOutputError


@dataclass(frozen=True)
class Ok:
    result: Any
    usage: Usage


@dataclass(frozen=True)
class Fail:
    error: ErrorInfo
    usage: Usage
    last_message: str | None = None


@dataclass(frozen=True)
class Retry:
    reason: str


Action = Ok | Fail | Retry


def _usage(body: dict[str, Any]) -> Usage:
    return usage_from_openai(body.get("usage"))


def failed_batch_actions(info: BatchInfo, count: int) -> list[Action]:
    """A batch that failed validation: lines the provider names are bad for good; the rest
    never ran and are retried."""
    bad: dict[int, str] = {}
    for e in info.errors:
        if e.line is not None and 1 <= e.line <= count:
            bad[e.line - 1] = f"{e.code}: {e.message}"
    summary = "; ".join(f"{e.code}: {e.message}" for e in info.errors[:3]) or "batch failed validation"
    actions: list[Action] = []
    for index in range(count):
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


class ActionCollector:
    """Turns output/error lines into per-item actions as they are read, so the response
    bodies of a large batch are never all held at once. A success wins over an error
    line for the same request."""

    def __init__(
        self, items: list[dict[str, Any]], registry: dict[str, HandlerSpec], *, status: str, max_attempts: int
    ) -> None:
        self._items = items
        self._registry = registry
        self._status = status
        self._max_attempts = max_attempts
        self._index = {item["cid"]: i for i, item in enumerate(items)}
        self._actions: list[Action | None] = [None] * len(items)

    def _action(self, item: dict[str, Any], outcome: LineOutcome | None) -> Action:
        return line_action(
            self._registry.get(item["handler"]),
            outcome,
            status=self._status,
            attempts=int(item.get("batch_attempts", 0)) + 1,
            max_attempts=self._max_attempts,
        )

    def add(self, lines: Iterable[tuple[str, LineOutcome]]) -> None:
        for cid, outcome in lines:
            index = self._index.get(cid)
            if index is None:
                continue  # not ours (or a line repeated by the provider)
            action = self._action(self._items[index], outcome)
            if self._actions[index] is None or isinstance(action, Ok):
                self._actions[index] = action

    def result(self) -> list[Action]:
        return [
            action if action is not None else self._action(item, None)
            for item, action in zip(self._items, self._actions, strict=True)
        ]


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
