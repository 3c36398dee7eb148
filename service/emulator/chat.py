"""``POST /v1/chat/completions``: validate a request body and compute the answer. PURE.

Shared by the sync endpoint and by batch processing, so a batch line gets exactly the
answer (and the errors) the same body would get synchronously.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from service.core.tokens import count_chat_tokens, count_tokens

from . import errors, ids
from .chat_params import check_messages, check_response_format, check_temperature, message_text, optional_int
from .errors import EmulatedError
from .faults import Markers, parse_markers, strip_markers
from .schema_synth import SchemaSynthesizer
from .synth import (
    digest,
    first_sentence,
    focus_text,
    keywords,
    seeded_random,
    summary_text,
    truncate_to_tokens,
)

REFUSAL_TEXT = "I'm sorry, but I can't help with that request."


@dataclass(frozen=True)
class AnswerContext:
    """What an answer depends on besides the request body."""

    seed: int
    now: int
    context_window: int = 128_000
    max_output_tokens: int = 16_384
    organization: str = "org-emulator"
    fingerprint: str = "fp_emulator0"
    # ``flaky(text, n)``: True while fewer than ``n`` earlier requests carried ``text``
    # (the ``[[emulator:flaky=N]]`` marker); counts live in the emulator's state.
    flaky: Callable[[str, int], bool] | None = None

    def fails_flaky(self, text: str, flaky: int | None) -> bool:
        return flaky is not None and self.flaky is not None and self.flaky(text, flaky)


@dataclass(frozen=True)
class ChatRequest:
    """A validated chat request."""

    model: str
    messages: list[dict[str, Any]]
    max_tokens: int | None
    format_type: str
    schema: Any
    n: int
    user_text: str
    prompt_tokens: int
    key: bytes

    @property
    def rate_limit_tokens(self) -> int:
        """Tokens charged against TPM: prompt plus the output asked for (as OpenAI counts)."""
        return self.prompt_tokens + (self.max_tokens or 0) * self.n


@dataclass(frozen=True)
class Answer:
    """A successful response body with its token usage."""

    body: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int


def parse_chat_request(body: Any, *, seed: int, max_output_tokens: int) -> ChatRequest:
    """Validate ``body`` like the real endpoint; raises :class:`EmulatedError` (400)."""
    if not isinstance(body, dict):
        raise EmulatedError(400, "Invalid body: the request body must be a JSON object.")
    if "model" not in body:
        raise errors.missing_param("model")
    if not isinstance(body["model"], str):
        raise errors.invalid_type("model", "a string", body["model"])
    if "messages" not in body:
        raise errors.missing_param("messages")
    messages = check_messages(body["messages"])
    if body.get("stream"):
        raise EmulatedError(
            400, "The emulator does not support streaming.", param="stream", code="unsupported_value"
        )
    max_tokens = optional_int(body, "max_completion_tokens", 1, 1 << 31)
    if max_tokens is None:
        max_tokens = optional_int(body, "max_tokens", 1, 1 << 31)
    if max_tokens is not None and max_tokens > max_output_tokens:
        param = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        raise EmulatedError(
            400,
            f"max_tokens is too large: {max_tokens}. This model supports at most {max_output_tokens} "
            f"completion tokens, whereas you provided {max_tokens}.",
            param=param,
            code="invalid_value",
        )
    check_temperature(body)
    n = optional_int(body, "n", 1, 128) or 1
    format_type, schema = check_response_format(body.get("response_format"))
    if format_type == "json_object" and not any("json" in message_text(m).lower() for m in messages):
        raise EmulatedError(
            400,
            "'messages' must contain the word 'json' in some form, to use 'response_format' of type "
            "'json_object'.",
            param="messages",
        )
    user_texts = [message_text(m) for m in messages if m.get("role") == "user"]
    user_text = user_texts[-1] if user_texts else "\n\n".join(message_text(m) for m in messages)
    canonical = json.dumps(body, sort_keys=True, ensure_ascii=False, default=str)
    return ChatRequest(
        model=body["model"],
        messages=messages,
        max_tokens=max_tokens,
        format_type=format_type,
        schema=schema,
        n=n,
        user_text=user_text,
        prompt_tokens=count_chat_tokens(messages),
        key=digest(str(seed), canonical),
    )


def answer_chat(request: ChatRequest, ctx: AnswerContext) -> Answer:
    """The ``chat.completion`` for a validated request, honouring markers and limits."""
    markers = parse_markers(request.user_text)
    if markers.status is not None:
        raise errors.error_for_status(markers.status, model=request.model, org=ctx.organization)
    if ctx.fails_flaky(request.user_text, markers.flaky):
        raise errors.error_for_status(500, model=request.model, org=ctx.organization)
    if markers.context_length or request.prompt_tokens > ctx.context_window:
        tokens = max(request.prompt_tokens, ctx.context_window + 1)
        raise errors.context_length_exceeded(ctx.context_window, tokens)
    if request.max_tokens is not None and request.prompt_tokens + request.max_tokens > ctx.context_window:
        raise EmulatedError(
            400,
            f"This model's maximum context length is {ctx.context_window} tokens. However, you requested "
            f"{request.prompt_tokens + request.max_tokens} tokens ({request.prompt_tokens} in the messages, "
            f"{request.max_tokens} in the completion). "
            "Please reduce the length of the messages or completion.",
            param="messages",
            code="context_length_exceeded",
        )
    choices = []
    completion_tokens = 0
    for index in range(request.n):
        choice, tokens = _choice(request, markers, index)
        choices.append(choice)
        completion_tokens += tokens
    body = {
        "id": ids.chat_completion_id(),
        "object": "chat.completion",
        "created": ctx.now,
        "model": request.model,
        "choices": choices,
        "usage": usage_body(request.prompt_tokens, completion_tokens),
        "service_tier": "default",
        "system_fingerprint": ctx.fingerprint,
    }
    return Answer(body=body, prompt_tokens=request.prompt_tokens, completion_tokens=completion_tokens)


def usage_body(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _choice(request: ChatRequest, markers: Markers, index: int) -> tuple[dict[str, Any], int]:
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None, "annotations": []}
    finish_reason = "stop"
    if markers.refusal:
        message["refusal"] = REFUSAL_TEXT
        return _wrap(index, message, finish_reason), count_tokens(REFUSAL_TEXT)
    content = generate_content(request, index, broken=markers.invalid_json)
    tokens = count_tokens(content)
    if request.max_tokens is not None and tokens > request.max_tokens:
        # Like the real API: cut at the limit even if that leaves invalid JSON.
        content = truncate_to_tokens(content, request.max_tokens)
        tokens = request.max_tokens
        finish_reason = "length"
    message["content"] = content
    return _wrap(index, message, finish_reason), tokens


def _wrap(index: int, message: dict[str, Any], finish_reason: str) -> dict[str, Any]:
    return {"index": index, "message": message, "logprobs": None, "finish_reason": finish_reason}


def generate_content(request: ChatRequest, index: int = 0, *, broken: bool = False) -> str:
    """Deterministic assistant content for the request's response format."""
    text = strip_markers(request.user_text)
    key = digest(request.key, str(index))
    focus = focus_text(text)
    if broken:
        # Unterminated object: not parseable, whatever the requested format.
        return f'Here is the JSON you asked for: {{"summary": "{first_sentence(focus) or "none"}"'
    if request.format_type == "json_schema":
        value = SchemaSynthesizer(request.schema, text=text, rng=seeded_random(key)).generate()
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if request.format_type == "json_object":
        value = {"summary": first_sentence(focus) or "No content.", "keywords": keywords(focus, 3)}
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return summary_text(text, key)
