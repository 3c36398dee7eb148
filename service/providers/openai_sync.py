"""The synchronous provider edge: the only code that calls chat completions and
embeddings. It sends a body built by a handler, and translates every failure into one
:class:`ProviderError` with a stable code. The SDK's own retries are off: the daemon's
retry policy decides (service/core/retry.py)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Protocol

import httpx2
import openai
from openai import AsyncOpenAI

from service.core import fastjson
from service.core.cost import Usage, usage_from_openai
from service.core.errors import ProviderError
from service.core.provider_errors import classify_status as classify_status


@dataclass(frozen=True)
class ProviderResponse:
    body: dict[str, Any]
    usage: Usage
    headers: dict[str, str]


class SyncProvider(Protocol):
    """What the sync path needs from a provider."""

    async def call(
        self, endpoint: str, body: dict[str, Any], *, timeout_s: float | None = None
    ) -> ProviderResponse: ...

    async def close(self) -> None: ...


def classify_exception(exc: Exception) -> ProviderError:
    if isinstance(exc, openai.APITimeoutError):
        return ProviderError("timeout", "the provider did not answer in time", retryable=True)
    if isinstance(exc, openai.APIConnectionError):
        return ProviderError("connection_error", f"cannot reach the provider: {exc}", retryable=True)
    if isinstance(exc, asyncio.TimeoutError):
        return ProviderError("timeout", "the provider did not answer in time", retryable=True)
    if isinstance(exc, openai.APIStatusError):
        body = exc.body if isinstance(exc.body, dict) else {}
        message = str(body.get("message") or exc.message)
        code = exc.code if isinstance(exc.code, str) else None
        return classify_status(exc.status_code, code, message, exc.response.headers)
    return ProviderError("provider_error", f"{type(exc).__name__}: {exc}", retryable=True)


class OpenAISyncProvider:
    """AsyncOpenAI with retries off and a bounded number of calls in flight."""

    def __init__(
        self,
        *,
        base_url: str | None,
        api_key: str | None,
        timeout_s: float,
        max_concurrency: int,
        organization: str | None = None,
        project: str | None = None,
    ) -> None:
        self._client = AsyncOpenAI(
            base_url=base_url,
            api_key=api_key or "unset",
            organization=organization,
            project=project,
            timeout=timeout_s,
            max_retries=0,
        )
        self._slots = asyncio.Semaphore(max_concurrency)

    @property
    def client(self) -> AsyncOpenAI:
        return self._client

    async def call(
        self, endpoint: str, body: dict[str, Any], *, timeout_s: float | None = None
    ) -> ProviderResponse:
        """One call; ``timeout_s`` overrides the client's timeout (flex calls are slower)."""
        options: Any = {} if timeout_s is None else {"timeout": timeout_s}
        async with self._slots:
            try:
                if endpoint == "/v1/embeddings":
                    # parse(): the SDK asks for base64 vectors and decodes them there.
                    raw: Any = await self._client.embeddings.with_raw_response.create(**body, **options)
                    data: Any = raw.parse().model_dump(mode="json")
                else:
                    # The body is already in wire form (handlers build it), so it goes out
                    # through the SDK's generic post: same client, auth, timeout and error
                    # classes, without re-transforming the parameters and building the
                    # response model, which cost more CPU than the rest of the sync path.
                    raw = await self._client.post(
                        "/chat/completions", cast_to=httpx2.Response, body=body, options=options
                    )
                    data = fastjson.loads(raw.content)
            except Exception as exc:  # noqa: BLE001 - every failure is classified here
                raise classify_exception(exc) from None
        if not isinstance(data, dict):
            raise ProviderError("provider_error", "the provider answered with no JSON object", retryable=True)
        return ProviderResponse(
            body=data, usage=usage_from_openai(data.get("usage")), headers=dict(raw.headers)
        )

    async def close(self) -> None:
        await self._client.close()
