"""Running one batch line and writing its output/error line. PURE.

A line goes through the same parse/answer code as the sync endpoint. Its result is one
of the three shapes OpenAI writes:

- success (output file): ``response.status_code == 200``, ``error: null``
- HTTP-level failure (error file): ``response`` with a 4xx/5xx status and an error body
- non-HTTP failure (error file): ``response: null``, ``error: {code, message}``
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from . import errors, ids
from .chat import Answer, AnswerContext, ChatRequest, answer_chat, parse_chat_request
from .embeddings import EmbeddingRequest, answer_embeddings, parse_embedding_request
from .errors import EmulatedError
from .faults import decide_line_fault, parse_markers
from .stats import prompt_digest

Request = ChatRequest | EmbeddingRequest
EXPIRED_MESSAGE = "This request could not be executed before the completion window expired."
CANCELLED_MESSAGE = "This request was not executed because the batch was cancelled."


@dataclass(frozen=True)
class LineResult:
    """The encoded output or error line of one request, with its usage."""

    custom_id: str
    ok: bool
    line: bytes
    prompt_tokens: int = 0
    completion_tokens: int = 0
    model: str | None = None
    cached_tokens: int = 0
    is_pack: bool = False
    packed_items: int = 0
    pack_dropped: int = 0
    prompt: str | None = None  # stats.prompt_digest of a chat line


def encode_line(value: dict[str, Any]) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def success_line(custom_id: str, body: dict[str, Any]) -> bytes:
    response = {"status_code": 200, "request_id": ids.request_id(), "body": body}
    return encode_line(
        {"id": ids.batch_request_id(), "custom_id": custom_id, "response": response, "error": None}
    )


def http_error_line(custom_id: str, error: EmulatedError) -> bytes:
    response = {"status_code": error.status, "request_id": ids.request_id(), "body": error.body()}
    return encode_line(
        {"id": ids.batch_request_id(), "custom_id": custom_id, "response": response, "error": None}
    )


def failure_line(custom_id: str, code: str, message: str) -> bytes:
    error = {"code": code, "message": message}
    return encode_line(
        {"id": ids.batch_request_id(), "custom_id": custom_id, "response": None, "error": error}
    )


def custom_id_of(raw: bytes) -> str:
    """The ``custom_id`` of an already validated line."""
    return str(json.loads(raw)["custom_id"])


def _parse(endpoint: str, body: Any, ctx: AnswerContext, unknown_models: frozenset[str]) -> Request:
    model = body.get("model") if isinstance(body, dict) else None
    if isinstance(model, str) and model in unknown_models:
        raise errors.model_not_found(model)
    if endpoint == "/v1/chat/completions":
        return parse_chat_request(body, seed=ctx.seed, max_output_tokens=ctx.max_output_tokens)
    if endpoint == "/v1/embeddings":
        return parse_embedding_request(body)
    raise EmulatedError(
        400, f"The emulator does not implement {endpoint}.", param="url", code="unsupported_value"
    )


def _marker_text(request: Request) -> str:
    if isinstance(request, ChatRequest):
        return request.user_text
    return "\n".join(request.texts)


def _answer(request: Request, ctx: AnswerContext) -> Answer:
    if isinstance(request, ChatRequest):
        return answer_chat(request, ctx)
    return answer_embeddings(request, ctx)


def run_line(
    raw: bytes,
    endpoint: str,
    ctx: AnswerContext,
    *,
    unknown_models: frozenset[str],
    line_error_rate: float,
    draw: float,
) -> LineResult:
    """Execute one validated input line; ``draw`` is this line's uniform random number."""
    obj = json.loads(raw)
    custom_id = str(obj["custom_id"])
    try:
        request = _parse(endpoint, obj["body"], ctx, unknown_models)
        fault = decide_line_fault(parse_markers(_marker_text(request)), line_error_rate, draw)
        if fault.error_code is not None:
            line = failure_line(custom_id, fault.error_code, _injected(fault.error_code))
            return LineResult(custom_id, False, line, model=request.model)
        if fault.status is not None:
            raise errors.error_for_status(fault.status, model=request.model, org=ctx.organization)
        answer = _answer(request, ctx)
    except EmulatedError as error:
        return LineResult(custom_id, False, http_error_line(custom_id, error), model=_model_of(obj))
    return LineResult(
        custom_id,
        True,
        success_line(custom_id, answer.body),
        prompt_tokens=answer.prompt_tokens,
        completion_tokens=answer.completion_tokens,
        model=request.model,
        cached_tokens=answer.cached_tokens,
        is_pack=isinstance(request, ChatRequest) and request.pack is not None,
        packed_items=answer.packed_items,
        pack_dropped=answer.pack_dropped,
        prompt=prompt_digest(request.model, request.user_text) if isinstance(request, ChatRequest) else None,
    )


def _model_of(obj: Any) -> str | None:
    body = obj.get("body") if isinstance(obj, dict) else None
    model = body.get("model") if isinstance(body, dict) else None
    return model if isinstance(model, str) else None


def _injected(code: str) -> str:
    return f"The request failed with error code '{code}' (injected by the emulator)."


def run_lines(
    lines: list[bytes],
    draws: list[float],
    endpoint: str,
    ctx: AnswerContext,
    *,
    unknown_models: frozenset[str],
    line_error_rate: float,
) -> list[LineResult]:
    """Execute a chunk of lines (runs in a worker thread: it is CPU-bound and pure)."""
    return [
        run_line(
            raw, endpoint, ctx, unknown_models=unknown_models, line_error_rate=line_error_rate, draw=draw
        )
        for raw, draw in zip(lines, draws, strict=True)
    ]
