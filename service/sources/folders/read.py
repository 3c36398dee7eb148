"""Step 3, *read*, of the life of a dropped file (:mod:`service.sources.folders`): the
claimed file is read into its manifest (:mod:`service.state.folder_files`), each record
validated against its handler; a record that fails locally gets its error event in the
spool and its DLQ entry in ``dlq.jsonl`` (bounded, :func:`service.core.events.fitted_entry`). Nothing is
published here, so a file that turns out unreadable has cost nothing."""

from __future__ import annotations

import json
import os
import stat
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from handlers import HandlerSpec
from service.core.entries import FileFormatError, LineError
from service.core.errors import BadItemError, ErrorInfo
from service.core.events import Outcome, dlq_entry, fitted_entry, result_event
from service.core.formats import iter_file
from service.core.items import Priority, item_from_object, raw_id, salvage
from service.state.folder_files import PREPARED, FileMeta, FileState
from service.state.safe_paths import display, private_open, temporary


@dataclass(frozen=True)
class ReadConfig:
    """What reading a file into items needs to know."""

    spec: HandlerSpec
    default_priority: Priority
    max_item_bytes: int
    max_tokens_param: str
    intake_subject: str


def prepare(state: FileState, meta: FileMeta, cfg: ReadConfig, max_file_bytes: int) -> FileMeta:
    """Read the claimed file into the manifest (items validated, local errors spooled).
    Nothing is published yet, so a file that turns out unreadable has cost nothing.
    Raises FileFormatError, or OSError for a :func:`temporary` fault (try again later)."""
    state.make()
    name = Path(meta.source).name
    try:
        fd = os.open(meta.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if temporary(exc):
            raise
        raise FileFormatError(f"cannot open {display(name)}: {exc.strerror}", "unreadable") from None
    with (
        os.fdopen(fd, "rb") as src,
        private_open(state.manifest, "wb") as manifest,
        private_open(state.spool, "wb") as spool,
        private_open(state.dlq, "wb") as dlq,
    ):
        check_regular(os.fstat(fd), max_file_bytes)
        records = errors = 0
        first_error: ErrorInfo | None = None
        try:
            for records, entry in enumerate(iter_file(name, src), 1):
                key, payload, bad = _record(records, entry, cfg, meta)
                manifest.write(f"{records}\t{key}\t".encode() + payload + b"\n")
                if bad is not None:
                    errors += 1
                    first_error = first_error or bad[2]
                    spool.write(f"{key}\t".encode() + bad[0] + b"\n")
                    dlq.write(bad[1] + b"\n")
        except UnicodeError as exc:
            raise FileFormatError(f"{display(name)} is not valid text: {exc}", "invalid_encoding") from None
        if records == 0:
            raise FileFormatError(f"{display(name)} holds no items", "no_items")
        if records == 1 and first_error is not None and first_error.code == "item_too_large":
            # the file is its one item: refused whole, nothing of it is published
            raise FileFormatError(first_error.message, "item_too_large")
        for f in (manifest, spool, dlq):
            f.flush()
            os.fsync(f.fileno())
    meta.records, meta.errors, meta.state = records, errors, PREPARED
    state.save(meta)
    return meta


def check_regular(st: os.stat_result, max_file_bytes: int) -> None:
    """Refuses what is no regular file, too large or empty (codes of docs/folders.md)."""
    if not stat.S_ISREG(st.st_mode):
        raise FileFormatError("not a regular file", "not_regular_file")
    if st.st_size > max_file_bytes:
        raise FileFormatError(
            f"the file is {st.st_size} bytes; folders.max_file_bytes is {max_file_bytes}", "file_too_large"
        )
    if st.st_size == 0:
        raise FileFormatError("the file is empty", "empty_file")


def _record(
    n: int, entry: dict[str, Any] | LineError, cfg: ReadConfig, meta: FileMeta
) -> tuple[str, bytes, tuple[bytes, bytes, ErrorInfo] | None]:
    """(manifest key, item JSON or b"", (error event, DLQ entry, error) for a bad record)."""
    if isinstance(entry, LineError):
        error = ErrorInfo(entry.code, entry.message, False)
        return f"!{n}", b"", _bad(entry.raw or b"", None, error, cfg, meta)
    try:
        item = item_from_object(entry, meta.handler, priority=cfg.default_priority)
        cfg.spec.build_body(item, max_tokens_param=cfg.max_tokens_param)  # template fields present?
        try:
            payload = json.dumps({**entry, "id": item.id, "priority": item.priority}, ensure_ascii=False)
        except (RecursionError, ValueError) as exc:  # read, but too deep (or too long a number) to write
            raise BadItemError("invalid_json", f"record {n} cannot be encoded again: {exc}") from None
        raw = payload.encode("utf-8", "replace")
        if len(raw) > cfg.max_item_bytes:
            raise BadItemError(
                "item_too_large", f"item is {len(raw)} bytes; the limit is {cfg.max_item_bytes}"
            )
    except BadItemError as exc:
        try:
            data = json.dumps(entry, ensure_ascii=False, default=str).encode("utf-8", "replace")
        except (RecursionError, ValueError):
            return f"!{n}", b"", _bad(entry_json(_shallow(entry)), None, exc.info(), cfg, meta)
        return f"!{n}", b"", _bad(data, entry, exc.info(), cfg, meta)
    return item.id, raw, None


def _shallow(entry: dict[str, Any]) -> dict[str, Any]:
    """The top-level keys of a record that can always be written (for its DLQ entry)."""
    out: dict[str, Any] = {}
    for key, value in entry.items():
        if isinstance(key, str) and (
            isinstance(value, str | bool | float)
            or value is None
            or (isinstance(value, int) and abs(value) < 2**63)
        ):
            out[key] = value
    return out


def _bad(
    raw: bytes, entry: dict[str, Any] | None, error: ErrorInfo, cfg: ReadConfig, meta: FileMeta
) -> tuple[bytes, bytes, ErrorInfo]:
    try:
        item_id, metadata, source = salvage(raw)
    except ValueError:  # e.g. an integer of more than 4300 digits
        item_id, metadata, source = raw_id(raw), None, None
    at = datetime.fromisoformat(meta.received_at.replace("Z", "+00:00"))
    event = result_event(
        Outcome(
            id=item_id,
            handler=meta.handler,
            route="sync",
            model=cfg.spec.model,
            received_at=at,
            completed_at=at,
            error=error,
            metadata=metadata,
            source=source,
        )
    )
    item = {k: v for k, v in entry.items() if isinstance(k, str)} if entry is not None else None
    if item is not None and len(raw) > cfg.max_item_bytes:
        item = None  # too large to dead-letter whole: a prefix of it, as raw text
    dlq = dlq_entry(
        id=item_id,
        handler=meta.handler,
        item=item,
        raw=None if item is not None else raw,
        error=error,
        attempts=0,
        subject=cfg.intake_subject,
        failed_at=at,
    )
    dlq["file"] = display(meta.rel)
    return entry_json(event), fitted_entry(dlq, entry_json, cfg.max_item_bytes), error


def entry_json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8", "replace")
