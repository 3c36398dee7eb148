"""Scalar values for schema synthesis: number bounds, string formats, name hints. PURE."""

from __future__ import annotations

import math
import random
import re
import uuid
from typing import Any

_UNIT_HINTS = ("score", "confidence", "probability", "ratio", "weight", "likelihood")
_PATTERN_CANDIDATES = (
    "abc", "ABC", "Abc", "a", "A", "1", "123", "abc123", "ABC-123", "2024-01-01", "09:30",
    "user@example.com", "https://example.com", "+15550100", "en", "EN", "en-US", "USD",
)  # fmt: skip

Schema = dict[str, Any]


def number_bounds(schema: Schema, name: str, *, integer: bool) -> tuple[float, float]:
    """Inclusive bounds for a number; exclusive limits are nudged inwards."""
    low = schema.get("minimum")
    high = schema.get("maximum")
    x_low = schema.get("exclusiveMinimum")
    x_high = schema.get("exclusiveMaximum")
    if x_low is True:  # draft-04 boolean form
        x_low, low = low, None
    if x_high is True:
        x_high, high = high, None
    lows: list[float] = [float(low)] if isinstance(low, int | float) else []
    highs: list[float] = [float(high)] if isinstance(high, int | float) else []
    if isinstance(x_low, int | float):
        lows.append(math.floor(x_low) + 1.0 if integer else x_low + 1e-6 * max(1.0, abs(x_low)))
    if isinstance(x_high, int | float):
        highs.append(math.ceil(x_high) - 1.0 if integer else x_high - 1e-6 * max(1.0, abs(x_high)))
    if not lows and not highs:
        unit = not integer and any(h in name.lower() for h in _UNIT_HINTS)
        lo, hi = (0.0, 1.0) if unit else (0.0, 100.0)
    elif not lows:
        hi = min(highs)
        lo = 0.0 if hi >= 0 else hi - 100.0
    elif not highs:
        lo = max(lows)
        hi = lo + 100.0
    else:
        lo, hi = max(lows), min(highs)
    if integer:
        return float(math.ceil(lo)), float(math.floor(hi))
    return float(lo), float(hi)


_FORMATS = {
    "date-time": "2024-05-{day:02d}T09:30:00Z",
    "date": "2024-05-{day:02d}",
    "time": "09:30:00",
    "email": "{word}@example.com",
    "idn-email": "{word}@example.com",
    "uri": "https://example.com/{word}",
    "url": "https://example.com/{word}",
    "iri": "https://example.com/{word}",
    "uri-reference": "/{word}",
    "hostname": "{word}.example.com",
    "ipv4": "192.0.2.{day}",
    "ipv6": "2001:db8::{day:x}",
    "duration": "P{day}D",
}


def format_value(fmt: str, word: str, rng: random.Random) -> str | None:
    """A value for a ``format`` keyword, or ``None`` when the format is unknown/absent."""
    if fmt == "uuid":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    template = _FORMATS.get(fmt)
    if template is None:
        return None
    return template.format(day=rng.randint(1, 28), word=word)


def hinted_value(name: str, word: str, rng: random.Random) -> str | None:
    if "email" in name:
        return f"{word}@example.com"
    if name.endswith(("url", "link", "website")):
        return f"https://example.com/{word}"
    if name in ("language", "lang", "language_code"):
        return "en"
    if name == "date" or name.endswith("_date"):
        return f"2024-05-{rng.randint(1, 28):02d}"
    return None


def match_pattern(pattern: str, value: str, words: list[str]) -> str:
    """``value`` if it matches, else the first simple candidate that does (best effort)."""
    try:
        compiled = re.compile(pattern)
    except re.error:
        return value
    for candidate in (value, *words, *_PATTERN_CANDIDATES):
        if compiled.search(candidate):
            return candidate
    return value
