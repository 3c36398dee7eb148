"""Parameter checks for chat completion requests, with the real API's error wording. PURE."""

from __future__ import annotations

import re
from typing import Any

from . import errors
from .errors import EmulatedError
from .schema_check import strict_schema_problem

ROLES = ("system", "assistant", "user", "function", "tool", "developer")
FORMAT_TYPES = ("json_object", "json_schema", "text")
_SCHEMA_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def message_text(message: dict[str, Any]) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p["text"] for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def check_messages(messages: Any) -> list[dict[str, Any]]:
    if not isinstance(messages, list):
        raise errors.invalid_type("messages", "an array", messages)
    if not messages:
        raise EmulatedError(
            400,
            "Invalid 'messages': empty array. Expected an array with minimum length 1, but got an empty "
            "array instead.",
            param="messages",
            code="empty_array",
        )
    for position, message in enumerate(messages):
        where = f"messages[{position}]"
        if not isinstance(message, dict):
            raise errors.invalid_type(where, "an object", message)
        if "role" not in message:
            raise errors.missing_param(f"{where}.role")
        if message["role"] not in ROLES:
            raise errors.invalid_value(f"{where}.role", message["role"], ROLES)
        content = message.get("content")
        if content is None and message["role"] in ("system", "user", "developer"):
            raise errors.missing_param(f"{where}.content")
        if content is not None and not isinstance(content, str | list):
            raise errors.invalid_type(f"{where}.content", "one of a string or array", content)
    return messages


def optional_int(body: dict[str, Any], name: str, low: int, high: int) -> int | None:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise errors.invalid_type(name, "an integer", value)
    if value < low:
        raise errors.integer_out_of_range(name, value, minimum=low)
    if value > high:
        raise errors.integer_out_of_range(name, value, maximum=high)
    return value


def check_temperature(body: dict[str, Any]) -> None:
    value = body.get("temperature")
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise errors.invalid_type("temperature", "a decimal", value)
    if not 0 <= value <= 2:
        side, bound, relation = ("above maximum", 2, "<=") if value > 2 else ("below minimum", 0, ">=")
        raise EmulatedError(
            400,
            f"Invalid 'temperature': decimal {side} value. Expected a value {relation} {bound}, "
            f"but got {value} instead.",
            param="temperature",
            code="decimal_above_max_value" if value > 2 else "decimal_below_min_value",
        )


def check_service_tier(body: dict[str, Any]) -> str | None:
    """``service_tier``: None when absent, else one of :data:`errors.SERVICE_TIERS`."""
    value = body.get("service_tier")
    if value is None:
        return None
    if not isinstance(value, str):
        raise errors.invalid_type("service_tier", "a string", value)
    if value not in errors.SERVICE_TIERS:
        raise errors.invalid_value("service_tier", value, errors.SERVICE_TIERS)
    return value


def check_response_format(value: Any) -> tuple[str, Any]:
    if value is None:
        return "text", None
    if not isinstance(value, dict):
        raise errors.invalid_type("response_format", "an object", value)
    kind = value.get("type")
    if kind is None:
        raise errors.missing_param("response_format.type")
    if kind not in FORMAT_TYPES:
        raise errors.invalid_value("response_format.type", kind, FORMAT_TYPES)
    if kind != "json_schema":
        return str(kind), None
    spec = value.get("json_schema")
    if spec is None:
        raise errors.missing_param("response_format.json_schema")
    if not isinstance(spec, dict):
        raise errors.invalid_type("response_format.json_schema", "an object", spec)
    name = spec.get("name")
    if name is None:
        raise errors.missing_param("response_format.json_schema.name")
    if not isinstance(name, str) or not _SCHEMA_NAME_RE.match(name):
        raise EmulatedError(
            400,
            f"Invalid 'response_format.json_schema.name': string does not match pattern. Expected a string "
            f"that matches the pattern '^[a-zA-Z0-9_-]+$', but got '{name}' instead.",
            param="response_format.json_schema.name",
            code="invalid_value",
        )
    schema = spec.get("schema", {"type": "object"})
    if spec.get("strict") is True:
        problem = strict_schema_problem(schema)
        if problem:
            raise EmulatedError(
                400, f"Invalid schema for response_format '{name}': {problem}", param="response_format"
            )
    return "json_schema", schema
