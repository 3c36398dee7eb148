"""JSON on the hot paths (intake, buffer records, batch files, result events and the
result store): orjson, about 20x faster than ``json`` at encoding and 5x at decoding.

``json`` takes over wherever orjson refuses something ``json`` accepts (non-string keys,
integers beyond 64 bits, ``NaN`` in input, lone surrogates), so nothing that worked with
the standard library is turned away. Output is compact UTF-8; when ``json`` writes it, it
is ASCII with escapes, so a lone surrogate (legal in a JSON string escape, not in UTF-8)
still makes valid JSON. ``NaN`` and ``Infinity`` (which ``json`` reads, though JSON has no
such numbers) are written as ``null``, so every payload is strict JSON."""

from __future__ import annotations

import json
import re
from typing import Any

import orjson

_FALLBACK = json.JSONEncoder(separators=(",", ":"))


def dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except (TypeError, orjson.JSONEncodeError):
        return _FALLBACK.encode(obj).encode("ascii")


# orjson reads an integer beyond 64 bits as a float (silently losing digits): text with a
# run of 19 or more digits anywhere (even inside a string) is left to ``json``.
_LONG_DIGITS_STR = re.compile(r"\d{19}")
_LONG_DIGITS_BYTES = re.compile(rb"\d{19}")


def loads(data: bytes | str) -> Any:
    """Raises ``json.JSONDecodeError`` (with ``json``'s message) for what is not JSON, and
    ``RecursionError`` for nesting deeper than ``json`` reads."""
    pattern = _LONG_DIGITS_STR if isinstance(data, str) else _LONG_DIGITS_BYTES
    if pattern.search(data) is not None:  # type: ignore[arg-type]
        return json.loads(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
