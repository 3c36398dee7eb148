"""HTTP failures of a provider, mapped to the error taxonomy (service/core/errors.py).
Pure: used by the sync edge (an SDK exception's status) and by batch output lines (a
line's ``response.status_code``), so both routes classify a status the same way."""

from __future__ import annotations

from typing import Any

from service.core.errors import ProviderError

_STATUS_CODES: dict[int, tuple[str, bool]] = {
    400: ("bad_request", False),
    401: ("auth_failed", False),
    403: ("permission_denied", False),
    404: ("not_found", False),
    408: ("timeout", True),
    409: ("provider_error", True),
    413: ("bad_request", False),
    422: ("bad_request", False),
    429: ("rate_limited", True),
}


def retry_after_s(headers: Any) -> float | None:
    """Seconds from ``retry-after-ms`` or ``retry-after`` (numeric form), else None."""
    if headers is None:
        return None
    for name, scale in (("retry-after-ms", 0.001), ("retry-after", 1.0)):
        value = headers.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) * scale
        except ValueError:
            continue
        if seconds >= 0:
            return seconds
    return None


def classify_status(status: int, code: str | None, message: str, headers: Any) -> ProviderError:
    """One place that maps an HTTP failure to our taxonomy."""
    if code == "context_length_exceeded":
        return ProviderError(code, message, retryable=False, status=status)
    if status == 429 and code == "insufficient_quota":
        # Out of credit: waiting does not help, an operator must act.
        return ProviderError("permission_denied", message, retryable=False, status=status)
    if status == 429 and code == "resource_unavailable":
        # Flex processing has no capacity now (CONTRACT §11): try flex later, or sync.
        return ProviderError(
            "resource_unavailable",
            message,
            retryable=True,
            status=status,
            retry_after_s=retry_after_s(headers),
        )
    if status >= 500:
        return ProviderError(
            "provider_error", message, retryable=True, status=status, retry_after_s=retry_after_s(headers)
        )
    name, retryable = _STATUS_CODES.get(status, ("bad_request", False))
    return ProviderError(
        name,
        message,
        retryable=retryable,
        status=status,
        retry_after_s=retry_after_s(headers) if retryable else None,
    )
