"""JSON on the hot paths (intake, buffer records, batch files, result events and the
result store): orjson, about 20x faster than ``json`` at encoding and 5x at decoding.

``json`` takes over wherever orjson refuses something ``json`` accepts (non-string keys,
integers beyond 64 bits, ``NaN`` in input, lone surrogates), so nothing that worked with
the standard library is turned away. Output is compact UTF-8; when ``json`` writes it, it
is ASCII with escapes, so a lone surrogate (legal in a JSON string escape, not in UTF-8)
still makes valid JSON."""

from __future__ import annotations

import json
from typing import Any

import orjson

_FALLBACK = json.JSONEncoder(separators=(",", ":"))


def dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except (TypeError, orjson.JSONEncodeError):
        return _FALLBACK.encode(obj).encode("ascii")


def loads(data: bytes | str) -> Any:
    """Raises ``json.JSONDecodeError`` (with ``json``'s message) for what is not JSON."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
