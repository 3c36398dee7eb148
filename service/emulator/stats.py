"""Counters exposed as ``Emulator.stats`` and ``GET /_emulator/stats``."""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any


def prompt_digest(model: str, text: str) -> str:
    """A chat request's identity in ``prompts``: its model and user text, hashed."""
    return hashlib.sha256(f"{model}\0{text}".encode()).hexdigest()[:16]


class Stats:
    """What the emulator has seen; tests assert on it (e.g. no custom_id sent twice)."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.requests: Counter[str] = Counter()
        self.status_counts: Counter[int] = Counter()
        self.faults_injected: Counter[str] = Counter()
        self.chat_requests_ok = 0
        self.embeddings_ok = 0
        self.batches_created = 0
        self.batch_lines_total = 0
        self.custom_ids_submitted: Counter[str] = Counter()
        self.custom_ids_succeeded: Counter[str] = Counter()
        self.tokens_in = 0
        self.tokens_out = 0
        self.batch_ids: list[str] = []
        # Second wave: tiers, prompt caching, packing.
        self.requests_by_tier: Counter[str] = Counter()
        self.requests_by_model: Counter[str] = Counter()
        self.chat_ok_by_tier: Counter[str] = Counter()
        self.flex_refusals = 0
        self.flex_unsupported_model = 0
        self.batch_lines_by_model: Counter[str] = Counter()
        self.cached_tokens = 0
        self.prompt_cache_hits = 0
        self.packed_requests = 0
        self.packed_items_answered = 0
        self.pack_answers_dropped = 0
        # Answered chat prompts (sync calls and batch lines) by prompt_digest: a count
        # above 1 is the same request paid twice.
        self.prompts: Counter[str] = Counter()

    def record_chat_answer(
        self, *, cached_tokens: int, packed_items: int, pack_dropped: int, is_pack: bool
    ) -> None:
        """Prompt-cache and pack counters of one successful chat answer (sync or batch line)."""
        self.cached_tokens += cached_tokens
        self.prompt_cache_hits += 1 if cached_tokens else 0
        if is_pack:
            self.packed_requests += 1
            self.packed_items_answered += packed_items
            self.pack_answers_dropped += pack_dropped

    def snapshot(self) -> dict[str, Any]:
        """A copy made of plain dicts and lists (``status_counts`` keys are ints)."""
        return {
            "requests": dict(self.requests),
            "status_counts": dict(self.status_counts),
            "faults_injected": dict(self.faults_injected),
            "chat_requests_ok": self.chat_requests_ok,
            "embeddings_ok": self.embeddings_ok,
            "batches_created": self.batches_created,
            "batch_lines_total": self.batch_lines_total,
            "custom_ids_submitted": dict(self.custom_ids_submitted),
            "custom_ids_succeeded": dict(self.custom_ids_succeeded),
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "batch_ids": list(self.batch_ids),
            "requests_by_tier": dict(self.requests_by_tier),
            "requests_by_model": dict(self.requests_by_model),
            "chat_ok_by_tier": dict(self.chat_ok_by_tier),
            "flex_refusals": self.flex_refusals,
            "flex_unsupported_model": self.flex_unsupported_model,
            "batch_lines_by_model": dict(self.batch_lines_by_model),
            "cached_tokens": self.cached_tokens,
            "prompt_cache_hits": self.prompt_cache_hits,
            "packed_requests": self.packed_requests,
            "packed_items_answered": self.packed_items_answered,
            "pack_answers_dropped": self.pack_answers_dropped,
            "prompts": dict(self.prompts),
        }
