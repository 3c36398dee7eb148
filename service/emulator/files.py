"""In-memory Files API store. PURE apart from ID generation; time is passed in.

Contents are kept as the uploaded ``bytes`` (never parsed copies), so a 50,000-line
batch file costs its size once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from . import errors, ids
from .errors import EmulatedError

PURPOSES = ("assistants", "batch", "fine-tune", "vision", "user_data", "evals")
OUTPUT_PURPOSES = ("batch_output",)
BATCH_FILE_TTL_S = 2_592_000  # 30 days, OpenAI's default for purpose=batch
MIN_EXPIRY_S = 3600
MAX_EXPIRY_S = 2_592_000


@dataclass
class FileRecord:
    """One stored file."""

    id: str
    filename: str
    purpose: str
    data: bytes
    created_at: int
    expires_at: int | None

    def to_dict(self) -> dict[str, Any]:
        """The ``FileObject`` JSON."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.data),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": self.expires_at,
        }


def file_not_found(file_id: str) -> EmulatedError:
    return EmulatedError(404, f"No such File object: {file_id}", param="id")


def expiry_seconds(anchor: str | None, seconds: str | None) -> int | None:
    """Validate the ``expires_after[anchor]`` / ``expires_after[seconds]`` form fields."""
    if anchor is None and seconds is None:
        return None
    if anchor is None:
        raise errors.missing_param("expires_after.anchor")
    if anchor != "created_at":
        raise errors.invalid_value("expires_after.anchor", anchor, ("created_at",))
    if seconds is None:
        raise errors.missing_param("expires_after.seconds")
    try:
        value = int(seconds)
    except ValueError:
        raise errors.invalid_type("expires_after.seconds", "an integer", seconds) from None
    if value < MIN_EXPIRY_S:
        raise errors.integer_out_of_range("expires_after.seconds", value, minimum=MIN_EXPIRY_S)
    if value > MAX_EXPIRY_S:
        raise errors.integer_out_of_range("expires_after.seconds", value, maximum=MAX_EXPIRY_S)
    return value


def check_upload(filename: str | None, purpose: str | None, has_file: bool) -> tuple[str, str]:
    """Validate an upload's ``file`` and ``purpose`` fields like ``POST /v1/files``."""
    if not has_file:
        raise errors.missing_param("file")
    if purpose is None:
        raise errors.missing_param("purpose")
    if purpose not in PURPOSES:
        raise errors.invalid_value("purpose", purpose, PURPOSES)
    name = filename or "upload"
    if purpose == "batch" and not name.endswith(".jsonl"):
        # Real wording; malformed *content* is only detected later, by the batch.
        raise EmulatedError(400, "Invalid file format for Batch API. Must be .jsonl")
    return name, purpose


class FileStore:
    """Files by ID, in creation order."""

    def __init__(self) -> None:
        self._files: dict[str, FileRecord] = {}

    def add(
        self, filename: str, purpose: str, data: bytes, *, now: int, expires_after_s: int | None = None
    ) -> FileRecord:
        if expires_after_s is None and purpose in ("batch", "batch_output"):
            expires_after_s = BATCH_FILE_TTL_S
        record = FileRecord(
            id=ids.file_id(),
            filename=filename,
            purpose=purpose,
            data=data,
            created_at=now,
            expires_at=now + expires_after_s if expires_after_s is not None else None,
        )
        self._files[record.id] = record
        return record

    def get(self, file_id: str) -> FileRecord:
        """The file, or a 404 :class:`EmulatedError`."""
        record = self._files.get(file_id)
        if record is None:
            raise file_not_found(file_id)
        return record

    def find(self, file_id: str) -> FileRecord | None:
        return self._files.get(file_id)

    def delete(self, file_id: str) -> None:
        if self._files.pop(file_id, None) is None:
            raise file_not_found(file_id)

    def page(
        self, *, purpose: str | None, after: str | None, limit: int, newest_first: bool
    ) -> tuple[list[FileRecord], bool]:
        """One page of files and whether more follow (cursor = ``after`` file ID)."""
        records = [r for r in self._files.values() if purpose is None or r.purpose == purpose]
        if newest_first:
            records.reverse()
        if after is not None:
            positions = [i for i, r in enumerate(records) if r.id == after]
            records = records[positions[0] + 1 :] if positions else []
        return records[:limit], len(records) > limit

    def __len__(self) -> int:
        return len(self._files)
