"""Small helpers shared by the aiohttp route modules."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from . import errors


async def read_json(request: web.Request) -> Any:
    """The request body as JSON, or the real API's 400 for an unparseable body."""
    raw = await request.read()
    try:
        return json.loads(raw) if raw else None
    except (UnicodeDecodeError, ValueError):
        raise errors.invalid_json_body() from None


def query_int(request: web.Request, name: str, *, default: int, low: int, high: int) -> int:
    """An integer query parameter within ``[low, high]`` (400 otherwise)."""
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise errors.invalid_type(name, "an integer", raw) from None
    if value < low:
        raise errors.integer_out_of_range(name, value, minimum=low)
    if value > high:
        raise errors.integer_out_of_range(name, value, maximum=high)
    return value


def list_body(data: list[dict[str, Any]], has_more: bool) -> dict[str, Any]:
    """A cursor page as OpenAI returns it (the SDK pages with ``after=<last_id>``)."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
