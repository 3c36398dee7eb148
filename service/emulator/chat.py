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
from .chat_params import (
    check_messages,
    check_response_format,
    check_service_tier,
    check_temperature,
    message_text,
    optional_int,
)
from .errors import EmulatedError
from .faults import Markers, parse_markers, strip_markers
from .pack import PackAnswer, PackSpec, detect_pack, pack_answer
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
    # ``prompt_cache(model, format_key, messages, prompt_tokens)``: cached tokens for this
    # prompt (and remember it); None = no prompt caching.
    prompt_cache: Callable[[str, str, list[dict[str, Any]], int], int] | None = None
    # ``pack_drop()``: how many answers the next packed answer omits (consumes one-shots).
    pack_drop: Callable[[], int] | None = None
    batch: bool = False
    """True for batch lines: the Batch API ignores ``service_tier``."""

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
    service_tier: str | None = None
    """As requested (validated); None when absent."""
    format_key: str = ""
    """Canonical JSON of ``response_format``: part of the prompt-cache key."""
    pack: PackSpec | None = None
    seed: int = 0

    @property
    def flex(self) -> bool:
        return self.service_tier == "flex"

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
    cached_tokens: int = 0
    service_tier: str = "default"
    packed_items: int = 0
    """Answers given in a packed answer (0 when not a pack)."""
    pack_dropped: int = 0
    """Items of a pack left without an answer (``pack_drop`` and ``pack_omit``)."""


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
    service_tier = check_service_tier(body)
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
    # The tier changes how a request is served, not what it answers.
    content_body = {k: v for k, v in body.items() if k != "service_tier"}
    canonical = json.dumps(content_body, sort_keys=True, ensure_ascii=False, default=str)
    response_format = body.get("response_format")
    format_key = (
        "" if response_format is None else json.dumps(response_format, sort_keys=True, ensure_ascii=False)
    )
    pack = detect_pack(schema, user_text) if format_type == "json_schema" else None
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
        service_tier=service_tier,
        format_key=format_key,
        pack=pack,
        seed=seed,
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
    packed: PackAnswer | None = None
    if request.pack is not None and not markers.refusal and not markers.invalid_json:
        drop = ctx.pack_drop() if ctx.pack_drop is not None else 0
        packed = pack_answer(request.pack, seed=request.seed, drop=drop)
    cached = 0
    if ctx.prompt_cache is not None:
        cached = ctx.prompt_cache(request.model, request.format_key, request.messages, request.prompt_tokens)
    choices = []
    completion_tokens = 0
    for index in range(request.n):
        choice, tokens = _choice(request, markers, index, packed)
        choices.append(choice)
        completion_tokens += tokens
    tier = served_tier(request.service_tier, batch=ctx.batch)
    body = {
        "id": ids.chat_completion_id(),
        "object": "chat.completion",
        "created": ctx.now,
        "model": request.model,
        "choices": choices,
        "usage": usage_body(request.prompt_tokens, completion_tokens, cached_tokens=cached),
        "service_tier": tier,
        "system_fingerprint": ctx.fingerprint,
    }
    return Answer(
        body=body,
        prompt_tokens=request.prompt_tokens,
        completion_tokens=completion_tokens,
        cached_tokens=cached,
        service_tier=tier,
        packed_items=packed.answered if packed is not None else 0,
        pack_dropped=packed.dropped if packed is not None else 0,
    )


def served_tier(requested: str | None, *, batch: bool = False) -> str:
    """The ``service_tier`` an answer reports: ``flex`` for flex, ``priority`` for
    ``priority`` or ``fast`` (as OpenAI reports fast mode), else ``default`` (``auto`` and
    ``scale`` run on the standard tier here; batch lines ignore the field)."""
    if batch or requested is None:
        return "default"
    if requested == "flex":
        return "flex"
    return "priority" if requested in ("priority", "fast") else "default"


def usage_body(prompt_tokens: int, completion_tokens: int, *, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": cached_tokens, "audio_tokens": 0},
        "completion_tokens_details": {
            "reasoning_tokens": 0,
            "audio_tokens": 0,
            "accepted_prediction_tokens": 0,
            "rejected_prediction_tokens": 0,
        },
    }


def _choice(
    request: ChatRequest, markers: Markers, index: int, packed: PackAnswer | None
) -> tuple[dict[str, Any], int]:
    message: dict[str, Any] = {"role": "assistant", "content": None, "refusal": None, "annotations": []}
    finish_reason = "stop"
    if markers.refusal:
        message["refusal"] = REFUSAL_TEXT
        return _wrap(index, message, finish_reason), count_tokens(REFUSAL_TEXT)
    if packed is not None:
        content = json.dumps(packed.value, ensure_ascii=False, separators=(",", ":"))
    else:
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
    if request.pack is not None:
        return json.dumps(
            pack_answer(request.pack, seed=request.seed, drop=0).value,
            ensure_ascii=False,
            separators=(",", ":"),
        )
    if request.format_type == "json_schema":
        value = SchemaSynthesizer(request.schema, text=text, rng=seeded_random(key)).generate()
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    if request.format_type == "json_object":
        value = {"summary": first_sentence(focus) or "No content.", "keywords": keywords(focus, 3)}
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"))
    return summary_text(text, key)
