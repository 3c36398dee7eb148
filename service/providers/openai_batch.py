"""The Batch API edge: files and batches through the official SDK, the only code that
calls them. Provider quirks are absorbed here: ``""`` file ids read as None, unknown
statuses pass through, every failure becomes a classified :class:`ProviderError`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from openai import AsyncOpenAI

from service.core.batch_info import KEY_FIELD, BatchError, BatchInfo
from service.providers.openai_sync import classify_exception


def _file_id(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def batch_info(batch: Any) -> BatchInfo:
    counts = batch.request_counts
    errors = []
    if batch.errors is not None and batch.errors.data:
        for e in batch.errors.data:
            errors.append(BatchError(str(e.code or "unknown"), str(e.message or ""), e.line))
    return BatchInfo(
        id=batch.id,
        status=str(batch.status),
        created_at=int(batch.created_at or 0),
        output_file_id=_file_id(batch.output_file_id),
        error_file_id=_file_id(batch.error_file_id),
        request_counts={
            "total": int(getattr(counts, "total", 0) or 0),
            "completed": int(getattr(counts, "completed", 0) or 0),
            "failed": int(getattr(counts, "failed", 0) or 0),
        },
        errors=errors,
        metadata=dict(batch.metadata or {}),
    )


class OpenAIBatchProvider:
    def __init__(self, client: AsyncOpenAI) -> None:
        # Our own retry and reconciliation decide; an SDK retry of batches.create could
        # create a second batch.
        self._client = client.with_options(max_retries=0)

    async def upload(self, name: str, data: bytes) -> str:
        try:
            f = await self._client.files.create(file=(name, data, "application/jsonl"), purpose="batch")
        except Exception as exc:  # noqa: BLE001
            raise classify_exception(exc) from None
        return f.id

    async def create(self, *, input_file_id: str, endpoint: str, flush_id: str) -> BatchInfo:
        try:
            batch = await self._client.batches.create(
                input_file_id=input_file_id,
                endpoint=endpoint,  # type: ignore[arg-type]
                completion_window="24h",
                metadata={KEY_FIELD: flush_id},
            )
        except Exception as exc:  # noqa: BLE001
            raise classify_exception(exc) from None
        return batch_info(batch)

    async def find(self, flush_id: str, *, created_after: float) -> BatchInfo | None:
        """The batch tagged with ``flush_id``, if one was created (newest first listing,
        stopping once batches are older than the flush)."""
        try:
            async for batch in self._client.batches.list(limit=100):
                if (batch.metadata or {}).get(KEY_FIELD) == flush_id:
                    return batch_info(batch)
                if batch.created_at and batch.created_at < created_after - 600:
                    return None
        except Exception as exc:  # noqa: BLE001
            raise classify_exception(exc) from None
        return None

    async def retrieve(self, batch_id: str) -> BatchInfo:
        try:
            return batch_info(await self._client.batches.retrieve(batch_id))
        except Exception as exc:  # noqa: BLE001
            raise classify_exception(exc) from None

    async def cancel(self, batch_id: str) -> BatchInfo:
        try:
            return batch_info(await self._client.batches.cancel(batch_id))
        except Exception as exc:  # noqa: BLE001
            raise classify_exception(exc) from None

    async def list(self, limit: int = 100) -> list[BatchInfo]:
        out: list[BatchInfo] = []
        try:
            async for batch in self._client.batches.list(limit=min(limit, 100)):
                out.append(batch_info(batch))
                if len(out) >= limit:
                    break
        except Exception as exc:  # noqa: BLE001
            raise classify_exception(exc) from None
        return out

    async def download(self, file_id: str) -> AsyncIterator[bytes]:
        """The file's content in chunks, streamed (output files can be large)."""
        try:
            async with self._client.files.with_streaming_response.content(file_id) as response:
                async for chunk in response.iter_bytes():
                    yield chunk
        except Exception as exc:  # noqa: BLE001
            raise classify_exception(exc) from None

    async def delete_file(self, file_id: str) -> None:
        try:
            await self._client.files.delete(file_id)
        except Exception:  # noqa: BLE001 - cleanup is best effort; files expire anyway
            pass
