"""Identifiers shaped like OpenAI's (``chatcmpl-…``, ``file-…``, ``batch_…``, ``req_…``).

IDs come from the OS random source, not from the seeded generators, so that drawing an
ID never shifts a test's reproducible fault or content sequence.
"""

from __future__ import annotations

import os
import secrets
import string

_ALNUM = string.ascii_letters + string.digits


def _alnum(length: int) -> str:
    # One urandom call per ID (IDs are drawn per batch line, so this is on a hot path).
    return "".join(_ALNUM[b % len(_ALNUM)] for b in os.urandom(length))


def chat_completion_id() -> str:
    return "chatcmpl-" + _alnum(29)


def file_id() -> str:
    return "file-" + _alnum(22)


def batch_id() -> str:
    return "batch_" + secrets.token_hex(16)


def batch_request_id() -> str:
    return "batch_req_" + secrets.token_hex(16)


def request_id() -> str:
    return "req_" + secrets.token_hex(16)
