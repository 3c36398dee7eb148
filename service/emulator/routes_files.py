"""Files API routes: upload (multipart), list, retrieve, delete, content."""

from __future__ import annotations

from aiohttp import BodyPartReader, web

from .errors import EmulatedError, error_for_status, invalid_value
from .files import check_upload, expiry_seconds
from .http_common import list_body, query_int
from .state import EmulatorState

_CHUNK_BYTES = 1 << 20
_MAX_FIELD_BYTES = 4096


class FileRoutes:
    """Route handlers for ``/v1/files``."""

    def __init__(self, state: EmulatorState) -> None:
        self._state = state

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/files", self.upload)
        router.add_get("/v1/files", self.list)
        router.add_get("/v1/files/{file_id}", self.retrieve)
        router.add_delete("/v1/files/{file_id}", self.delete)
        router.add_get("/v1/files/{file_id}/content", self.content)

    async def upload(self, request: web.Request) -> web.StreamResponse:
        await self._state.sleep(self._state.faults.file_upload_latency_s)
        if self._state.faults.file_upload_status is not None:
            self._state.stats.faults_injected["file_upload_status"] += 1
            raise error_for_status(self._state.faults.file_upload_status)
        if not request.content_type.startswith("multipart/"):
            raise EmulatedError(
                400, f"Invalid Content-Type header ({request.content_type}), expected multipart/form-data."
            )
        fields: dict[str, str] = {}
        data: bytes | None = None
        filename: str | None = None
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue  # nested multipart: not something the SDK sends
            if part.name == "file":
                filename = part.filename
                data = await self._read_file(part)
            elif part.name:
                raw = bytearray()
                while chunk := await part.read_chunk(_MAX_FIELD_BYTES):
                    raw.extend(chunk[: max(0, _MAX_FIELD_BYTES - len(raw))])
                fields[part.name] = raw.decode("utf-8", errors="replace")
        name, purpose = check_upload(filename, fields.get("purpose"), data is not None)
        expiry = expiry_seconds(fields.get("expires_after[anchor]"), fields.get("expires_after[seconds]"))
        record = self._state.files.add(
            name, purpose, data or b"", now=self._state.now(), expires_after_s=expiry
        )
        return web.json_response(record.to_dict())

    async def _read_file(self, part: BodyPartReader) -> bytes:
        limit = self._state.config.max_upload_bytes
        buffer = bytearray()
        while chunk := await part.read_chunk(_CHUNK_BYTES):
            buffer.extend(chunk)
            if len(buffer) > limit:
                raise EmulatedError(
                    400, f"File is too large. The maximum file size is {limit} bytes.", param="file"
                )
        return bytes(buffer)

    async def list(self, request: web.Request) -> web.StreamResponse:
        order = request.query.get("order", "desc")
        if order not in ("asc", "desc"):
            raise invalid_value("order", order, ("asc", "desc"))
        records, has_more = self._state.files.page(
            purpose=request.query.get("purpose"),
            after=request.query.get("after"),
            limit=query_int(request, "limit", default=10_000, low=1, high=10_000),
            newest_first=order == "desc",
        )
        return web.json_response(list_body([r.to_dict() for r in records], has_more))

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._state.files.get(request.match_info["file_id"]).to_dict())

    async def delete(self, request: web.Request) -> web.StreamResponse:
        file_id = request.match_info["file_id"]
        self._state.files.delete(file_id)
        return web.json_response({"id": file_id, "object": "file", "deleted": True})

    async def content(self, request: web.Request) -> web.StreamResponse:
        record = self._state.files.get(request.match_info["file_id"])
        return web.Response(body=record.data, content_type="application/octet-stream")
