"""OpenAI-shaped errors: ``{"error": {"message", "type", "param", "code"}}`` + HTTP status.

Messages copy the wording of the real API where it is known, because clients (and the
daemon's classifier) key on ``status``, ``type`` and ``code``, and humans on the message.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

SERVER_ERROR_MESSAGE = "The server had an error while processing your request. Sorry about that!"
OVERLOADED_MESSAGE = "The engine is currently overloaded, please try again later."
RATE_LIMIT_DOCS = "Visit https://platform.openai.com/account/rate-limits to learn more."


class EmulatedError(Exception):
    """An error answer: HTTP ``status`` plus the fields of OpenAI's error envelope."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type_: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers: dict[str, str] = dict(headers or {})

    def body(self) -> dict[str, Any]:
        """The JSON body, exactly as OpenAI sends it."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def json_type_name(value: Any) -> str:
    """How OpenAI names a JSON value's type in 'Invalid type' messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def missing_param(name: str) -> EmulatedError:
    return EmulatedError(
        400, f"Missing required parameter: '{name}'.", param=name, code="missing_required_parameter"
    )


def invalid_type(name: str, expected: str, value: Any) -> EmulatedError:
    message = f"Invalid type for '{name}': expected {expected}, but got {json_type_name(value)} instead."
    return EmulatedError(400, message, param=name, code="invalid_type")


def _quote_list(values: Sequence[str]) -> str:
    quoted = [f"'{v}'" for v in values]
    if len(quoted) <= 2:
        return " and ".join(quoted)
    return ", ".join(quoted[:-1]) + ", and " + quoted[-1]


def invalid_value(name: str, value: Any, supported: Sequence[str]) -> EmulatedError:
    message = f"Invalid value: '{value}'. Supported values are: {_quote_list(supported)}."
    return EmulatedError(400, message, param=name, code="invalid_value")


def integer_out_of_range(
    name: str, value: Any, *, minimum: int | None = None, maximum: int | None = None
) -> EmulatedError:
    if minimum is not None:
        message = (
            f"Invalid '{name}': integer below minimum value. "
            f"Expected a value >= {minimum}, but got {value} instead."
        )
        return EmulatedError(400, message, param=name, code="integer_below_min_value")
    message = (
        f"Invalid '{name}': integer above maximum value. "
        f"Expected a value <= {maximum}, but got {value} instead."
    )
    return EmulatedError(400, message, param=name, code="integer_above_max_value")


def invalid_json_body() -> EmulatedError:
    return EmulatedError(
        400,
        "We could not parse the JSON body of your request. (HINT: This likely means you aren't using "
        "your HTTP library correctly. The OpenAI API expects a JSON payload, but what was sent was not "
        "valid JSON. If you have trouble figuring out how to fix this, please contact us through our "
        "help center at "
        "help.openai.com.)",
    )


def model_not_found(model: str) -> EmulatedError:
    return EmulatedError(
        404,
        f"The model `{model}` does not exist or you do not have access to it.",
        code="model_not_found",
    )


def context_length_exceeded(limit: int, tokens: int) -> EmulatedError:
    message = (
        f"This model's maximum context length is {limit} tokens. However, your messages resulted in "
        f"{tokens} tokens. Please reduce the length of the messages."
    )
    return EmulatedError(400, message, param="messages", code="context_length_exceeded")


SERVICE_TIERS = ("auto", "default", "flex", "scale", "priority", "fast")


def flex_not_supported(model: str) -> EmulatedError:
    """400 for ``service_tier: "flex"`` on a model without Flex processing (no fallback)."""
    return EmulatedError(
        400,
        f"Unsupported value: 'service_tier' does not support 'flex' with this model. Flex processing is "
        f"not available for the model '{model}'; use service_tier 'auto' or 'default', or a model that "
        "supports Flex processing.",
        param="service_tier",
        code="unsupported_value",
    )


FLEX_UNAVAILABLE_CODE = "resource_unavailable"


def flex_resource_unavailable(model: str, *, retry_after_s: float | None) -> EmulatedError:
    """429 ``resource_unavailable``: not enough Flex capacity right now (never billed)."""
    headers = retry_after_headers(retry_after_s) if retry_after_s is not None else {}
    return EmulatedError(
        429,
        f"Resource Unavailable: there is not enough capacity to serve this Flex processing request for "
        f"{model} right now. Please retry later with exponential backoff, or send it with service_tier "
        "'auto' or 'default'. You have not been charged for this request.",
        type_=FLEX_UNAVAILABLE_CODE,
        code=FLEX_UNAVAILABLE_CODE,
        headers=headers,
    )


def server_error() -> EmulatedError:
    return EmulatedError(500, SERVER_ERROR_MESSAGE, type_="server_error")


def overloaded() -> EmulatedError:
    return EmulatedError(503, OVERLOADED_MESSAGE, type_="server_error")


def retry_after_headers(seconds: float) -> dict[str, str]:
    """``retry-after`` (whole seconds, rounded up) and ``retry-after-ms``, as OpenAI sends them."""
    whole = int(seconds) if float(seconds).is_integer() else int(seconds) + 1
    return {"retry-after": str(max(whole, 0)), "retry-after-ms": str(max(round(seconds * 1000), 0))}


def rate_limited(message: str, *, kind: str, retry_after_s: float | None) -> EmulatedError:
    """429 ``rate_limit_exceeded``; ``kind`` is ``requests`` or ``tokens`` (OpenAI's ``type``)."""
    headers = retry_after_headers(retry_after_s) if retry_after_s is not None else {}
    return EmulatedError(429, message, type_=kind, code="rate_limit_exceeded", headers=headers)


def error_for_status(
    status: int, *, model: str = "the model", org: str = "org-emulator", retry_after_s: float = 1.0
) -> EmulatedError:
    """A realistic error for an arbitrary status (markers, scripted faults)."""
    if status == 400:
        return EmulatedError(400, "Invalid request (injected by the emulator).")
    if status == 401:
        return EmulatedError(
            401,
            "Incorrect API key provided. You can find your API key at https://platform.openai.com/account/api-keys.",
            code="invalid_api_key",
        )
    if status == 403:
        return EmulatedError(
            403,
            "Country, region, or territory not supported",
            type_="request_forbidden",
            code="unsupported_country_region_territory",
        )
    if status == 404:
        return model_not_found(model)
    if status == 429:
        message = (
            f"Rate limit reached for {model} in organization {org} on requests per min (RPM): "
            "Limit 500, Used 500, Requested 1. "
            f"Please try again in {retry_after_s:g}s. {RATE_LIMIT_DOCS}"
        )
        return rate_limited(message, kind="requests", retry_after_s=retry_after_s)
    if status == 503:
        return overloaded()
    if status >= 500:
        error = server_error()
        error.status = status
        return error
    return EmulatedError(status, f"Request failed with status {status} (injected by the emulator).")


def mask_api_key(key: str) -> str:
    """Mask a key the way OpenAI does in 401 messages: a short prefix and the last 4 characters.

    Short keys reveal less (nothing at all under 8 characters), so the full key never
    appears in an answer or a log line.
    """
    if len(key) >= 16:
        return f"{key[:5]}****{key[-4:]}"
    if len(key) >= 8:
        return f"{key[:2]}****{key[-2:]}"
    return "****"


def incorrect_api_key(presented: str) -> EmulatedError:
    return EmulatedError(
        401,
        f"Incorrect API key provided: {mask_api_key(presented)}. You can find your API key at "
        "https://platform.openai.com/account/api-keys.",
        code="invalid_api_key",
    )


def missing_api_key() -> EmulatedError:
    return EmulatedError(
        401,
        "You didn't provide an API key. You need to provide your API key in an Authorization header "
        "using Bearer auth (i.e. Authorization: Bearer YOUR_KEY), or as the password field (with blank "
        "username) if you're accessing the API from your browser and are prompted for a username. You "
        "can obtain an API key from https://platform.openai.com/account/api-keys.",
    )
