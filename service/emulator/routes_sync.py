"""``POST /v1/chat/completions`` and ``POST /v1/embeddings`` with faults and rate limits,
plus ``GET /v1/models`` (no faults there: it serves as a connectivity check).

Order of checks per request: JSON body → added latency → injected fault (script or
random) → body validation (400, incl. ``service_tier``) → unknown model (404) → flex:
model without flex (400), flex capacity (429 ``resource_unavailable``) → RPM/TPM limits
(429) → flex latency → markers and context window → answer.
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from . import errors
from .chat import answer_chat, parse_chat_request
from .embeddings import answer_embeddings, parse_embedding_request
from .errors import EmulatedError
from .http_common import read_json
from .limits import LimitDecision, format_duration
from .state import EmulatorState
from .stats import prompt_digest

LISTED_MODELS = ("gpt-4o-mini", "gpt-4o", "gpt-4.1-mini", "text-embedding-3-small", "text-embedding-3-large")
_MODEL_CREATED = 1_715_367_049


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _MODEL_CREATED, "owned_by": "system"}


class SyncRoutes:
    """Route handlers for the two synchronous model endpoints."""

    def __init__(self, state: EmulatorState) -> None:
        self._state = state

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/chat/completions", self.chat)
        router.add_post("/v1/embeddings", self.embeddings)
        router.add_get("/v1/models", self.models)
        router.add_get("/v1/models/{model}", self.model)

    async def models(self, request: web.Request) -> web.StreamResponse:
        """A short model list, so ``client.models.list()`` works as a connectivity check."""
        data = [_model_object(name) for name in LISTED_MODELS]
        return web.json_response({"object": "list", "data": data})

    async def model(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["model"]
        self._check_model(name)
        return web.json_response(_model_object(name))

    async def chat(self, request: web.Request) -> web.StreamResponse:
        state = self._state
        body = await read_json(request)
        self._count_wire(body)
        await self._inject_fault(body)
        chat = parse_chat_request(
            body, seed=state.config.seed, max_output_tokens=state.config.max_output_tokens
        )
        self._check_model(chat.model)
        if chat.flex:
            self._check_flex(chat.model)
        headers = self._admit(chat.model, chat.rate_limit_tokens)
        if chat.flex:
            await state.sleep(state.faults.flex_latency_s)
        try:
            answer = answer_chat(chat, state.answer_context())
        except EmulatedError as error:
            error.headers.update(headers)
            raise
        stats = state.stats
        stats.chat_requests_ok += 1
        stats.prompts[prompt_digest(chat.model, chat.user_text)] += 1
        stats.tokens_in += answer.prompt_tokens
        stats.tokens_out += answer.completion_tokens
        stats.chat_ok_by_tier[answer.service_tier] += 1
        stats.record_chat_answer(
            cached_tokens=answer.cached_tokens,
            packed_items=answer.packed_items,
            pack_dropped=answer.pack_dropped,
            is_pack=chat.pack is not None,
        )
        return web.json_response(answer.body, headers=headers)

    def _count_wire(self, body: Any) -> None:
        """Per-tier and per-model counts of chat requests as they arrive (before any fault)."""
        stats = self._state.stats
        tier = body.get("service_tier") if isinstance(body, dict) else None
        model = body.get("model") if isinstance(body, dict) else None
        stats.requests_by_tier[tier if isinstance(tier, str) else "default"] += 1
        stats.requests_by_model[model if isinstance(model, str) else "(none)"] += 1

    def _check_flex(self, model: str) -> None:
        """Flex needs a model that offers it (400, no fallback) and spare capacity (429)."""
        state = self._state
        if not state.flex_supported(model):
            state.stats.flex_unsupported_model += 1
            raise errors.flex_not_supported(model)
        if state.flex_refused():
            # Refused before the RPM/TPM window: an unserved flex call is not charged.
            state.stats.flex_refusals += 1
            state.stats.faults_injected["flex_unavailable"] += 1
            raise errors.flex_resource_unavailable(model, retry_after_s=state.faults.flex_retry_after_s)

    async def embeddings(self, request: web.Request) -> web.StreamResponse:
        state = self._state
        body = await read_json(request)
        await self._inject_fault(body)
        embedding = parse_embedding_request(body)
        self._check_model(embedding.model)
        headers = self._admit(embedding.model, embedding.rate_limit_tokens)
        try:
            answer = answer_embeddings(embedding, state.answer_context())
        except EmulatedError as error:
            error.headers.update(headers)
            raise
        state.stats.embeddings_ok += 1
        state.stats.tokens_in += answer.prompt_tokens
        return web.json_response(answer.body, headers=headers)

    async def _inject_fault(self, body: Any) -> None:
        state = self._state
        faults = state.faults
        await state.sleep(faults.latency_s)
        fault = state.next_sync_fault()
        if not fault.injected:
            return
        state.stats.faults_injected[fault.source] += 1
        if fault.timeout:
            # Answer (normally) only after the client's timeout has fired.
            await state.sleep(faults.timeout_sleep_s)
            return
        model = body.get("model") if isinstance(body, dict) else None
        raise errors.error_for_status(
            fault.status or 500,
            model=model if isinstance(model, str) else "the model",
            org=state.config.organization,
            retry_after_s=faults.retry_after_s,
        )

    def _check_model(self, model: str) -> None:
        if model in self._state.unknown_models:
            raise errors.model_not_found(model)

    def _admit(self, model: str, tokens: int) -> dict[str, str]:
        """Apply RPM/TPM; the ``x-ratelimit-*`` headers to send, or a 429."""
        state = self._state
        rpm, tpm = state.faults.rpm, state.faults.tpm
        if rpm is None and tpm is None:
            return {}
        decision = state.limiter.check(model, tokens, rpm=rpm, tpm=tpm, now=state.clock())
        if decision.allowed:
            return decision.headers
        state.stats.faults_injected[f"limit_{decision.kind}"] += 1
        error = errors.rate_limited(
            _limit_message(decision, model, state.config.organization),
            kind=decision.kind or "requests",
            retry_after_s=decision.retry_after_s,
        )
        error.headers.update(decision.headers)
        raise error


def _limit_message(decision: LimitDecision, model: str, org: str) -> str:
    unit = "requests per min (RPM)" if decision.kind == "requests" else "tokens per min (TPM)"
    if decision.retry_after_s is None:
        return (
            f"Request too large for {model} in organization {org} on {unit}: Limit {decision.limit}, "
            f"Requested {decision.requested}. "
            "The input or output tokens must be reduced in order to run successfully. "
            f"{errors.RATE_LIMIT_DOCS}"
        )
    return (
        f"Rate limit reached for {model} in organization {org} on {unit}: Limit {decision.limit}, Used "
        f"{decision.used}, Requested {decision.requested}. Please try again in "
        f"{format_duration(decision.retry_after_s)}. {errors.RATE_LIMIT_DOCS}"
    )
