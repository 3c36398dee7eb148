"""What reading a file yields (pure types shared by :mod:`service.core.formats` and
:mod:`service.core.emails`): item dicts, :class:`LineError` for one bad record, and
:class:`FileFormatError` when the whole file cannot be read."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class FileFormatError(ValueError):
    """The whole file cannot be read. ``code`` is one of the codes in docs/folders.md."""

    def __init__(self, message: str, code: str = "invalid_format") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class LineError:
    """One record of a multi-record file is bad; ``line`` is 1-based. ``code`` is a
    bad-item code (service.core.errors.BAD_ITEM_CODES); ``raw`` the record's bytes, if any."""

    line: int
    code: str
    message: str
    raw: bytes | None = None


Entry = dict[str, Any] | LineError
