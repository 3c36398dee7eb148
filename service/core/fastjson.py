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
from typing import Any

import orjson

_FALLBACK = json.JSONEncoder(separators=(",", ":"))


def dumps(obj: Any) -> bytes:
    try:
        return orjson.dumps(obj)
    except (TypeError, orjson.JSONEncodeError):
        return _FALLBACK.encode(obj).encode("ascii")


# orjson reads an integer beyond 64 bits as a float (silently losing digits): input with
# a run of 19 or more digits anywhere (even inside a string) is left to ``json``. Found by
# mapping digits to "1" and the rest to "0" (C speed, ~1 µs per KB; a regex takes ~10).
_DIGIT_MAP = bytes(49 if 48 <= c <= 57 else 48 for c in range(256))
_LONG_RUN = b"1" * 19


def _has_long_digit_run(data: bytes) -> bool:
    return _LONG_RUN in data.translate(_DIGIT_MAP)


def loads(data: bytes | str) -> Any:
    """Raises ``json.JSONDecodeError`` (with ``json``'s message) for what is not JSON, and
    ``RecursionError`` for nesting deeper than ``json`` reads."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if _has_long_digit_run(raw):
        return json.loads(data)
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)
