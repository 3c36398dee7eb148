"""Automatic prompt caching, as OpenAI reports it in ``usage.prompt_tokens_details``.

OpenAI caches prompts of 1,024 tokens or more; a later request to the same model whose
prompt starts with a recently seen prefix gets ``cached_tokens`` = the longest shared
prefix, counted in steps of 128 tokens after the first 1,024 (1024, 1152, 1280, ...).

The prompt's token sequence (:func:`prompt_token_ids`) has exactly ``prompt_tokens``
entries, in this order: per message 3 framing tokens, the role, then the content (text
parts in order); then 3 reply-priming tokens. The ``response_format`` (its canonical
JSON) does not add tokens but keys the cache, as if it came before the messages: the same
schema + system prompt gives the same prefix; another schema shares no prefix at all.

Memory stays bounded: only the SHA-256 of each prefix ending on a 1024 + 128·k boundary
is kept (with the time it was last seen), in an LRU of at most ``max_entries`` hashes.
Entries older than ``ttl_s`` (emulator clock) no longer count. Thread-safe: batch lines
look up and store from worker threads.
"""

from __future__ import annotations

import hashlib
import threading
from array import array
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any

from .synth import encode_tokens

MIN_CACHED_TOKENS = 1024
CACHE_STEP_TOKENS = 128
# Framing tokens stand outside the real vocabulary, so no text can collide with them.
_MESSAGE_FRAME = (0x7FFF_FF01, 0x7FFF_FF02, 0x7FFF_FF03)
_REPLY_FRAME = (0x7FFF_FF11, 0x7FFF_FF12, 0x7FFF_FF13)


def cacheable_length(shared_prefix: int) -> int:
    """``shared_prefix`` rounded down to the 1024 + 128·k grid (0 below 1,024)."""
    if shared_prefix < MIN_CACHED_TOKENS:
        return 0
    return MIN_CACHED_TOKENS + (shared_prefix - MIN_CACHED_TOKENS) // CACHE_STEP_TOKENS * CACHE_STEP_TOKENS


def _boundaries(length: int) -> Iterator[int]:
    boundary = MIN_CACHED_TOKENS
    while boundary <= length:
        yield boundary
        boundary += CACHE_STEP_TOKENS


def prompt_token_ids(messages: list[dict[str, Any]]) -> list[int]:
    """The prompt as one token sequence; its length equals ``count_chat_tokens(messages)``."""
    tokens: list[int] = []
    for message in messages:
        tokens.extend(_MESSAGE_FRAME)
        content = message.get("content")
        role = message.get("role")
        if isinstance(role, str):
            tokens.extend(encode_tokens(role))
        if isinstance(content, str):
            tokens.extend(encode_tokens(content))
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    tokens.extend(encode_tokens(part["text"]))
    tokens.extend(_REPLY_FRAME)
    return tokens


def prefix_hashes(namespace: bytes, tokens: list[int]) -> list[tuple[int, bytes]]:
    """``(boundary, sha256 of namespace + tokens[:boundary])`` for every grid boundary."""
    h = hashlib.sha256(namespace)
    out: list[tuple[int, bytes]] = []
    done = 0
    for boundary in _boundaries(len(tokens)):
        h.update(array("I", tokens[done:boundary]).tobytes())
        done = boundary
        out.append((boundary, h.copy().digest()))
    return out


class PromptCache:
    """Prefix hashes seen recently, per model (the model is part of the namespace)."""

    def __init__(self, *, ttl_s: float, max_entries: int, clock: Callable[[], float]) -> None:
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._clock = clock
        self._seen: OrderedDict[bytes, float] = OrderedDict()
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._seen)

    def clear(self) -> None:
        with self._lock:
            self._seen.clear()

    def cached_tokens(
        self, model: str, schema_key: str, messages: list[dict[str, Any]], prompt_tokens: int
    ) -> int:
        """Cached tokens for this prompt, then remember its prefixes (for later requests)."""
        if prompt_tokens < MIN_CACHED_TOKENS:
            return 0
        namespace = hashlib.sha256(f"{len(model)}:{model}\n{schema_key}".encode()).digest()
        hashes = prefix_hashes(namespace, prompt_token_ids(messages))
        now = self._clock()
        cached = 0
        with self._lock:
            # A prefix hash covers every token before it, so the longest fresh hit wins.
            for boundary, key in reversed(hashes):
                seen_at = self._seen.get(key)
                if seen_at is not None and now - seen_at <= self._ttl_s:
                    cached = boundary
                    break
            for _, key in hashes:
                self._seen[key] = now
                self._seen.move_to_end(key)
            while len(self._seen) > self._max_entries:
                self._seen.popitem(last=False)
        return cached
