"""One error taxonomy for the whole daemon.

Every failure that reaches a result event is an :class:`EnrichError` with a stable
``code`` (documented in ``docs/errors.md``) and a ``retryable`` flag. Bad input is
:class:`BadItemError` (never retryable); provider failures are classified once, in the
provider edge, into :class:`ProviderError` with an optional ``retry_after_s``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# Bad items (CONTRACT §6). Each code names exactly one way an item can be malformed.
BAD_ITEM_CODES: dict[str, str] = {
    "invalid_utf8": "the message body is not valid UTF-8",
    "invalid_json": "the message body is not valid JSON",
    "not_an_object": "the item is JSON but not an object",
    "missing_text": "the item has no `text`",
    "invalid_text": "`text` is not a string",
    "empty_text": "`text` is empty or only whitespace",
    "invalid_fields": "`fields` is not an object of strings",
    "invalid_id": "`id` is not 1-128 characters of A-Za-z0-9._:-",
    "invalid_priority": "`priority` is not urgent, high, normal or low",
    "invalid_deadline": "`deadline` is not an RFC 3339 timestamp with a time zone",
    "invalid_metadata": "`metadata` is not an object",
    "invalid_source": "`source` is not a string",
    "unknown_field": "the item has a key the contract does not define",
    "unknown_handler": "no handler of that name is configured",
    "item_too_large": "the message is larger than limits.max_item_bytes",
    "missing_template_field": "the handler's prompt names a field the item does not carry",
    "bad_pipeline_state": "a message on a pipeline's subject looks like a step message but cannot be read",
}

# Provider and processing failures.
RETRYABLE_CODES: dict[str, str] = {
    "rate_limited": "the provider answered 429 (rate limit)",
    "provider_error": "the provider answered 5xx",
    "timeout": "the provider did not answer in time",
    "connection_error": "the provider could not be reached",
    "batch_expired": "the batch expired before this request ran",
    "batch_cancelled": "the batch was cancelled before this request ran",
    "batch_lost": "the provider lost the batch or its output file, also after resubmitting it",
    "max_deliveries": "the intake message was delivered nats.max_deliver times without completing",
    "budget_exceeded": "a sync request found today's budget spent (intake items wait instead)",
    "internal": "the daemon failed while handling a sync request (its log says why)",
}
PERMANENT_CODES: dict[str, str] = {
    "bad_request": "the provider rejected the request (400/422)",
    "auth_failed": "the provider rejected the API key (401)",
    "permission_denied": "the key may not use this model or endpoint (403)",
    "not_found": "the model or endpoint does not exist (404)",
    "context_length_exceeded": "the input is longer than the model's context window",
    "invalid_output": "the model's answer was not valid against the handler's schema (after one retry)",
    "refused": "the model refused to answer",
    "output_truncated": "the answer hit max_output_tokens before it was complete",
}

ALL_CODES: dict[str, str] = {**BAD_ITEM_CODES, **RETRYABLE_CODES, **PERMANENT_CODES}


@dataclass(frozen=True)
class ErrorInfo:
    """The ``error`` object of a result event."""

    code: str
    message: str
    retryable: bool
    step: str | None = None  # a pipeline's failed step (CONTRACT §14)

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"code": self.code, "message": self.message, "retryable": self.retryable}
        if self.step is not None:
            out["step"] = self.step
        return out


class EnrichError(Exception):
    """A failure with a stable code; ``retryable`` says whether trying again may help."""

    code: str = "internal"
    retryable: bool = False

    def __init__(self, code: str, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        if retryable is not None:
            self.retryable = retryable

    def info(self) -> ErrorInfo:
        return ErrorInfo(self.code, self.message, self.retryable)


class BadItemError(EnrichError):
    """The item itself is malformed; sending it again unchanged will fail again."""

    retryable = False

    def __init__(self, code: str, message: str) -> None:
        if code not in BAD_ITEM_CODES:
            raise ValueError(f"unknown bad-item code {code!r}")
        super().__init__(code, message, retryable=False)


class ProviderError(EnrichError):
    """A provider call failed. ``retry_after_s`` is the server's hint, when it gave one."""

    def __init__(
        self,
        code: str,
        message: str,
        *,
        retryable: bool,
        status: int | None = None,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(code, message, retryable=retryable)
        self.status = status
        self.retry_after_s = retry_after_s


class InvalidOutputError(EnrichError):
    """The model answered, but not in the shape the handler needs."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(code, message, retryable=False)
