"""Validation of a batch input file (JSONL), as done while a batch is ``validating``. PURE.

Error codes follow what OpenAI-compatible services report (``invalid_json_line``,
``url_mismatch``, ``duplicate_custom_id``, ``model_mismatch``, ``too_many_tasks``,
``empty_file``, ...). Lines are located by byte offsets so processing can re-read them
from the stored bytes instead of keeping parsed copies.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from service.core.tokens import count_chat_tokens, count_tokens

ALLOWED_ENDPOINTS = (
    "/v1/responses",
    "/v1/chat/completions",
    "/v1/embeddings",
    "/v1/completions",
    "/v1/moderations",
    "/v1/images/generations",
    "/v1/images/edits",
    "/v1/videos",
)
REQUIRED_KEYS = ("custom_id", "method", "url", "body")
MAX_INPUT_BYTES = 200 * 1024 * 1024
MAX_EMBEDDING_INPUTS = 50_000
MAX_REPORTED_ERRORS = 10


def batch_error(
    code: str, message: str, *, param: str | None = None, line: int | None = None
) -> dict[str, Any]:
    """One entry of a batch's ``errors.data``."""
    return {"code": code, "message": message, "param": param, "line": line}


def iter_line_spans(data: bytes) -> Iterator[tuple[int, int, int]]:
    """``(line_number, start, end)`` of every non-blank line (1-based numbers)."""
    start = 0
    number = 0
    size = len(data)
    while start < size:
        end = data.find(b"\n", start)
        if end < 0:
            end = size
        number += 1
        stop = end - 1 if end > start and data[end - 1 : end] == b"\r" else end
        if data[start:stop].strip():
            yield number, start, stop
        start = end + 1


def prompt_tokens_of(endpoint: str, body: dict[str, Any]) -> int:
    """Prompt tokens a line will use (what counts against the enqueued-token limit)."""
    if endpoint == "/v1/embeddings":
        raw = body.get("input")
        items = [raw] if isinstance(raw, str) else raw if isinstance(raw, list) else []
        if items and all(isinstance(t, int) for t in items):
            return len(items)
        return sum(
            count_tokens(i) if isinstance(i, str) else len(i) if isinstance(i, list) else 0 for i in items
        )
    messages = body.get("messages")
    if isinstance(messages, list) and all(isinstance(m, dict) for m in messages):
        return count_chat_tokens(messages)
    return 0


def embedding_input_count(body: dict[str, Any]) -> int:
    raw = body.get("input")
    if isinstance(raw, list) and raw and not all(isinstance(t, int) for t in raw):
        return len(raw)
    return 1


@dataclass
class InputSummary:
    """What validation learned about a file."""

    spans: list[tuple[int, int, int]] = field(default_factory=list)
    custom_ids: list[str] = field(default_factory=list)
    model: str | None = None
    prompt_tokens: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)


class _Validator:
    def __init__(self, endpoint: str, *, max_lines: int, unknown_models: frozenset[str], count: bool) -> None:
        self.endpoint = endpoint
        self.max_lines = max_lines
        self.unknown_models = unknown_models
        self.count = count
        self.summary = InputSummary()
        self.seen_ids: set[str] = set()
        self.embedding_inputs = 0

    def feed(self, number: int, raw: bytes) -> None:
        try:
            obj = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, ValueError):
            obj = None
        if not isinstance(obj, dict):
            self.fail("invalid_json_line", "This line is not parseable as valid JSON.", line=number)
            return
        custom_id = obj.get("custom_id")
        if isinstance(custom_id, str):
            self.summary.custom_ids.append(custom_id)
        problem = self.structure_problem(obj)
        if problem is not None:
            code, message, param = problem
            self.fail(code, message, param=param, line=number)
            return
        self.check_body(obj["body"], number)
        self.seen_ids.add(obj["custom_id"])

    def structure_problem(self, obj: dict[str, Any]) -> tuple[str, str, str] | None:
        for key in REQUIRED_KEYS:
            if key not in obj:
                return "invalid_request", f"Missing required parameter: '{key}'.", key
        if not isinstance(obj["custom_id"], str) or not obj["custom_id"]:
            return "invalid_request", "Invalid 'custom_id': expected a non-empty string.", "custom_id"
        if obj["method"] != "POST":
            return (
                "invalid_request",
                f"Invalid value: '{obj['method']}'. Supported values are: 'POST'.",
                "method",
            )
        if obj["url"] != self.endpoint:
            return (
                "url_mismatch",
                "The URL provided for this request does not match the batch endpoint.",
                "url",
            )
        if not isinstance(obj["body"], dict):
            return "invalid_request", "Invalid 'body': expected an object.", "body"
        if obj["custom_id"] in self.seen_ids:
            message = (
                "The custom_id for this request is a duplicate of another request. The custom_id parameter "
                "must be unique for each request in a batch."
            )
            return "duplicate_custom_id", message, "custom_id"
        return None

    def check_body(self, body: dict[str, Any], number: int) -> None:
        model = body.get("model")
        if not isinstance(model, str):
            self.fail(
                "invalid_request",
                "Missing required parameter: 'body.model'.",
                param="body.model",
                line=number,
            )
            return
        if model in self.unknown_models:
            message = f"The provided model '{model}' is not supported by the Batch API."
            self.fail("model_not_found", message, param="body.model", line=number)
            return
        if self.summary.model is None:
            self.summary.model = model
        elif model != self.summary.model:
            message = (
                "The provided model does not match the model of other requests in this batch. "
                "Each batch may only target a single model."
            )
            self.fail("model_mismatch", message, param="body.model", line=number)
            return
        if self.endpoint == "/v1/embeddings":
            self.embedding_inputs += embedding_input_count(body)
        if self.count:
            self.summary.prompt_tokens += prompt_tokens_of(self.endpoint, body)

    def fail(self, code: str, message: str, *, param: str | None = None, line: int | None = None) -> None:
        if len(self.summary.errors) < MAX_REPORTED_ERRORS:
            self.summary.errors.append(batch_error(code, message, param=param, line=line))


def validate_batch_input(
    data: bytes, endpoint: str, *, max_lines: int, unknown_models: frozenset[str], count_tokens: bool
) -> InputSummary:
    """Check every line of ``data`` for a batch on ``endpoint``.

    ``count_tokens`` makes it sum the prompt tokens (needed only when an enqueued-token
    limit applies; counting 50,000 prompts takes seconds).
    """
    validator = _Validator(endpoint, max_lines=max_lines, unknown_models=unknown_models, count=count_tokens)
    summary = validator.summary
    if len(data) > MAX_INPUT_BYTES:
        validator.fail("too_large", f"The batch input file is larger than the {MAX_INPUT_BYTES} bytes limit.")
        return summary
    for number, start, end in iter_line_spans(data):
        if len(summary.spans) >= max_lines:
            message = f"The batch input file is larger than the {max_lines} maximum number of requests."
            summary.errors = [batch_error("too_many_tasks", message)]
            return summary
        summary.spans.append((number, start, end))
        validator.feed(number, data[start:end])
    if not summary.spans:
        message = "The input file is empty. Please ensure that the batch contains at least one request."
        validator.fail("empty_file", message)
    elif validator.embedding_inputs > MAX_EMBEDDING_INPUTS:
        message = f"The batch contains more than {MAX_EMBEDDING_INPUTS} embedding inputs."
        validator.fail("too_many_tasks", message)
    return summary
