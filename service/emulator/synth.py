"""Deterministic synthetic content: text derived from the input, and embeddings. PURE.

Everything here is a function of its arguments only (no clock, no global random state),
so the same request always gets the same answer, in the sync endpoint and in batches.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import math
import random
import re
import sys
from array import array
from typing import Any

import tiktoken

from service.core.tokens import ENCODING_NAME

_WORD_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9'’\-]*")
_SENTENCE_END_RE = re.compile(r"(?<=[.!?])\s+")
_STOPWORDS = frozenset(
    """a an and are as at be been but by can could did do does for from had has have he her his how i if in
    into is it its just me more most my no not of on or our out over she so some such than that the their
    them then there these they this those to too under up very was we were what when where which while who
    why will with would you your also about after again all any because before being both each few here
    only other own same should through until down off once summarise summarize classify extract note text
    following please""".split()
)
_FALLBACK_WORDS = ("general", "overview", "details", "context", "summary", "topic", "item", "note")
_SECOND_SENTENCES = (
    "It mentions {a}, {b} and {c}.",
    "Key points: {a}, {b}, {c}.",
    "The main topics are {a}, {b} and {c}.",
)


def digest(*parts: str | bytes) -> bytes:
    """SHA-256 over the parts, separated so that ("ab", "c") != ("a", "bc")."""
    h = hashlib.sha256()
    for part in parts:
        data = part.encode("utf-8") if isinstance(part, str) else part
        h.update(len(data).to_bytes(8, "little"))
        h.update(data)
    return h.digest()


def seeded_random(*parts: str | bytes) -> random.Random:
    """A private ``random.Random`` seeded from the parts (stable across processes)."""
    return random.Random(int.from_bytes(digest(*parts)[:16], "big"))


def focus_text(text: str) -> str:
    """The part of a prompt that carries the content: its longest paragraph.

    Prompts usually look like ``"Summarise this note titled X:\\n\\n<the note>"``; the
    note, not the instruction, is what a summary should talk about.
    """
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", text) if p.strip()]
    if not paragraphs:
        return ""
    return max(paragraphs, key=len)


def first_sentence(text: str, *, max_words: int = 24) -> str:
    """The first sentence of ``text``, at most ``max_words`` words, ending in punctuation."""
    flat = " ".join(text.split())
    if not flat:
        return ""
    sentence = _SENTENCE_END_RE.split(flat, maxsplit=1)[0]
    words = sentence.split()
    if len(words) > max_words:
        sentence = " ".join(words[:max_words]).rstrip(",;:") + "..."
    if sentence[-1] not in ".!?":
        sentence = sentence.rstrip(",;:") + "."
    return sentence


def words_of(text: str) -> list[str]:
    """All words of ``text`` in order."""
    return _WORD_RE.findall(text)


def keywords(text: str, count: int) -> list[str]:
    """Up to ``count`` distinct content words (lower case) in order of first appearance,
    padded with neutral fallback words so callers always get ``count`` of them."""
    seen: dict[str, None] = {}
    for word in words_of(text):
        lowered = word.lower().strip("'’-")
        if len(lowered) >= 3 and lowered not in _STOPWORDS and not lowered.isdigit():
            seen.setdefault(lowered, None)
        if len(seen) >= count:
            break
    result = list(seen)
    for fallback in _FALLBACK_WORDS:
        if len(result) >= count:
            break
        if fallback not in seen:
            result.append(fallback)
    return result[:count]


def summary_text(text: str, key: bytes) -> str:
    """A short summary-like answer derived from ``text``; ``key`` picks the wording."""
    focus = focus_text(text)
    if not focus:
        return "There is no content to summarise."
    a, b, c = keywords(focus, 3)
    template = _SECOND_SENTENCES[key[0] % len(_SECOND_SENTENCES)]
    return f"{first_sentence(focus)} {template.format(a=a, b=b, c=c)}"


@functools.lru_cache(maxsize=1)
def _encoding() -> Any:
    return tiktoken.get_encoding(ENCODING_NAME)


def encode_tokens(text: str) -> tuple[int, ...]:
    """The token ids of ``text`` (same table and rules as ``service.core.tokens.count_tokens``).

    Long texts are memoised: they are mostly system prompts, the same in every request.
    """
    if not text:
        return ()
    if len(text) >= _MEMO_MIN_CHARS:
        return _encode_memo(text)
    return tuple(_encoding().encode(text, disallowed_special=()))


_MEMO_MIN_CHARS = 2_000


@functools.lru_cache(maxsize=64)
def _encode_memo(text: str) -> tuple[int, ...]:
    return tuple(_encoding().encode(text, disallowed_special=()))


def truncate_to_tokens(text: str, max_tokens: int) -> str:
    """The longest prefix of ``text`` that fits in ``max_tokens`` tokens."""
    tokens = _encoding().encode(text, disallowed_special=())
    if len(tokens) <= max_tokens:
        return text
    return str(_encoding().decode(tokens[:max_tokens]))


# --- embeddings ---------------------------------------------------------------------

_FEATURES_PER_WORD = 8
_NOISE_WEIGHT = 0.35


def embedding_vector(text: str, dimensions: int, *, seed: int) -> list[float]:
    """A unit-norm float32 vector for ``text``.

    Feature hashing of the words plus a small text-specific noise term: texts that share
    words get a high cosine similarity (useful for demos), identical texts get identical
    vectors, and the cost is linear in the number of words, not words x dimensions.
    """
    vector = [0.0] * dimensions
    seed_bytes = str(seed).encode()
    for word in words_of(text.lower()):
        h = hashlib.blake2b(word.encode("utf-8"), digest_size=32, key=seed_bytes[:64]).digest()
        for i in range(_FEATURES_PER_WORD):
            chunk = int.from_bytes(h[i * 4 : i * 4 + 4], "little")
            vector[chunk % dimensions] += 1.0 if chunk & 0x80000000 else -1.0
    noise = seeded_random("embedding", str(seed), text)
    vector = [v + _NOISE_WEIGHT * noise.gauss(0.0, 1.0) for v in vector]
    norm = math.sqrt(sum(v * v for v in vector)) or 1.0
    # Round-trip through float32 so the float and base64 encodings carry identical numbers.
    return array("f", (v / norm for v in vector)).tolist()


def encode_embedding(vector: list[float], encoding_format: str) -> list[float] | str:
    """``float`` → the list; ``base64`` → little-endian float32 bytes, base64-encoded
    (what the openai SDK requests by default and decodes)."""
    if encoding_format == "base64":
        packed = array("f", vector)
        if packed.itemsize != 4:  # pragma: no cover - every supported platform has 4-byte floats
            raise RuntimeError("float32 array expected")
        data = packed.tobytes() if _little_endian() else _swapped(packed)
        return base64.b64encode(data).decode("ascii")
    return vector


def _little_endian() -> bool:
    return sys.byteorder == "little"


def _swapped(packed: array[float]) -> bytes:
    copy = array("f", packed)
    copy.byteswap()
    return copy.tobytes()
