"""Durable state of the dropped files being worked on (CONTRACT §7), one directory per
file under ``<state_dir>/folders/<key>/``:

* ``meta.json``: what the file is (inbox path, handler, claimed source) and its state:
  ``reading`` (claimed: being moved into ``inbox/.processing/`` and read) → ``prepared``
  (read and validated, items maybe partly published) → ``accepted`` (every item PubAck'ed
  by intake). Written atomically.
* ``manifest.tsv``: one line per record in input order, ``<n>\\t<key>\\t<item JSON>``;
  ``key`` is the item id, or ``!<n>`` for a record that failed locally.
* ``spool.tsv``: ``<key>\\t<result event JSON>``, appended (and fsynced) as results arrive;
  the first line for a key wins.
* ``dlq.jsonl``: DLQ entries of the records that failed locally.

The folder feature is local by nature (inbox and outbox are local directories), so its
bookkeeping lives beside them rather than in JetStream; every file here is either
written atomically or append-only with duplicates ignored, so a SIGKILL at any point
leaves something the next start can finish (docs/folders.md)."""

from __future__ import annotations

import json
import os
import shutil
import stat
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, BinaryIO

from handlers import HandlerSpec
from service.core.entries import FileFormatError, LineError
from service.core.errors import BadItemError, ErrorInfo
from service.core.events import Outcome, dlq_entry, iso, result_event
from service.core.formats import iter_file
from service.core.items import Priority, item_from_object, salvage

READING = "reading"
PREPARED = "prepared"
ACCEPTED = "accepted"


@dataclass
class FileMeta:
    key: str
    rel: str  # path relative to the inbox, as dropped
    handler: str
    source: str  # where the claimed file waits: inbox/.processing/<key>/<name>
    received_at: str
    state: str = READING
    records: int = 0
    errors: int = 0
    moved_to: str | None = None  # where the source went in inbox/.done/


@dataclass(frozen=True)
class ReadConfig:
    """What reading a file into items needs to know."""

    spec: HandlerSpec
    default_priority: Priority
    max_item_bytes: int
    max_tokens_param: str
    intake_subject: str


def display(text: str) -> str:
    """A path as valid Unicode (names that are not UTF-8 keep a replacement character)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


class FileState:
    def __init__(self, root: Path, key: str) -> None:
        self.dir = root / key
        self.meta_path = self.dir / "meta.json"
        self.manifest = self.dir / "manifest.tsv"
        self.spool = self.dir / "spool.tsv"
        self.dlq = self.dir / "dlq.jsonl"

    def save(self, meta: FileMeta) -> None:
        atomic_write(self.meta_path, json.dumps(asdict(meta)).encode())

    def load(self) -> FileMeta | None:
        try:
            return FileMeta(**json.loads(self.meta_path.read_bytes()))
        except (OSError, ValueError, TypeError):
            return None

    def append(self, lines: list[tuple[str, bytes]]) -> None:
        """Append results to the spool; durable when this returns."""
        with self.spool.open("ab") as f:
            for key, event in lines:
                f.write(key.encode() + b"\t" + event.replace(b"\n", b" ") + b"\n")
            f.flush()
            os.fsync(f.fileno())

    def spooled(self) -> set[str]:
        if not self.spool.exists():
            return set()
        with self.spool.open("rb") as f:
            return {line.split(b"\t", 1)[0].decode() for line in f if line.endswith(b"\n")}

    def waiting(self) -> list[str]:
        """Item ids of the manifest whose result is not spooled yet."""
        done = self.spooled()
        with self.manifest.open("rb") as f:
            keys = (line.split(b"\t", 2)[1].decode() for line in f)
            return [key for key in keys if not key.startswith("!") and key not in done]

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def read_chunk(f: BinaryIO, limit: int) -> list[tuple[int, str, bytes]]:
    """Up to ``limit`` manifest lines that carry an item: (n, id, item JSON)."""
    out: list[tuple[int, str, bytes]] = []
    for line in f:
        n, key, payload = line.rstrip(b"\n").split(b"\t", 2)
        if payload:
            out.append((int(n), key.decode(), payload))
        if len(out) >= limit:
            break
    return out


def prepare(state: FileState, meta: FileMeta, cfg: ReadConfig, max_file_bytes: int) -> FileMeta:
    """Read the claimed file into the manifest (items validated, local errors spooled).
    Nothing is published yet, so a file that turns out unreadable has cost nothing.
    Raises FileFormatError."""
    state.dir.mkdir(parents=True, exist_ok=True)
    name = Path(meta.source).name
    try:
        fd = os.open(meta.source, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise FileFormatError(f"cannot open {display(name)}: {exc.strerror}", "unreadable") from None
    with os.fdopen(fd, "rb") as src, state.manifest.open("wb") as manifest, state.spool.open("wb") as spool:
        check_regular(os.fstat(fd), max_file_bytes)
        with state.dlq.open("wb") as dlq:
            records = errors = 0
            try:
                for records, entry in enumerate(iter_file(name, src), 1):
                    key, payload, bad = _record(records, entry, cfg, meta)
                    manifest.write(f"{records}\t{key}\t".encode() + payload + b"\n")
                    if bad is not None:
                        errors += 1
                        spool.write(f"{key}\t".encode() + bad[0] + b"\n")
                        dlq.write(bad[1] + b"\n")
            except UnicodeError as exc:
                raise FileFormatError(
                    f"{display(name)} is not valid text: {exc}", "invalid_encoding"
                ) from None
            if records == 0:
                raise FileFormatError(f"{display(name)} holds no items", "no_items")
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
) -> tuple[str, bytes, tuple[bytes, bytes] | None]:
    """(manifest key, item JSON or b"", (error event, DLQ entry) for a bad record)."""
    if isinstance(entry, LineError):
        return (
            f"!{n}",
            b"",
            _bad(entry.raw or b"", None, ErrorInfo(entry.code, entry.message, False), cfg, meta),
        )
    try:
        item = item_from_object(entry, meta.handler, priority=cfg.default_priority)
        cfg.spec.build_body(item, max_tokens_param=cfg.max_tokens_param)  # template fields present?
        payload = json.dumps({**entry, "id": item.id, "priority": item.priority}, ensure_ascii=False)
        raw = payload.encode("utf-8", "replace")
        if len(raw) > cfg.max_item_bytes:
            raise BadItemError(
                "item_too_large", f"item is {len(raw)} bytes; the limit is {cfg.max_item_bytes}"
            )
    except BadItemError as exc:
        data = json.dumps(entry, ensure_ascii=False, default=str).encode("utf-8", "replace")
        return f"!{n}", b"", _bad(data, entry, exc.info(), cfg, meta)
    return item.id, raw, None


def _bad(
    raw: bytes, entry: dict[str, Any] | None, error: ErrorInfo, cfg: ReadConfig, meta: FileMeta
) -> tuple[bytes, bytes]:
    item_id, metadata, source = salvage(raw)
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
    return _dumps(event), _dumps(dlq)


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8", "replace")


def write_results(state: FileState, target: Path) -> dict[str, int]:
    """Write the results file in input order, atomically; returns counts by outcome."""
    index: dict[bytes, tuple[int, int]] = {}
    with state.spool.open("rb") as spool:
        offset = 0
        for line in spool:
            key, _, rest = line.partition(b"\t")
            if line.endswith(b"\n") and key not in index:
                index[key] = (offset + len(key) + 1, len(rest))
            offset += len(line)
    counts = {"items": 0, "ok": 0, "error": 0, "cached": 0}
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    with state.manifest.open("rb") as manifest, state.spool.open("rb") as spool, tmp.open("wb") as out:
        for line in manifest:
            key = line.split(b"\t", 2)[1]
            if key not in index:
                raise RuntimeError(f"no result for {key.decode()} in {state.dir}")
            spool.seek(index[key][0])
            data = spool.read(index[key][1])
            out.write(data)
            event = json.loads(data)
            counts["items"] += 1
            counts["ok" if event.get("status") == "ok" else "error"] += 1
            counts["cached"] += bool(event.get("cached"))
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, target)
    fsync_dir(target.parent)
    return counts


# -- moving files around ---------------------------------------------------------------------


def atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unique_path(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/stem (2).ext`` ... when that is taken."""
    candidate, n = folder / name, 1
    stem, dot, ext = name.rpartition(".") if "." in name.lstrip(".") else (name, "", "")
    while os.path.lexists(candidate) or os.path.lexists(f"{candidate}.error.json"):
        n += 1
        candidate = folder / (f"{stem} ({n}){dot}{ext}")
    return candidate


def move_into(folder: Path, path: Path) -> Path:
    """Move ``path`` (a file, or the link itself for a symlink) into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    target = unique_path(folder, path.name)
    os.rename(path, target)
    return target


def write_error(
    target: Path, *, rel: str, handler: str | None, code: str, message: str, at: datetime
) -> Path:
    """``<file>.error.json`` beside a failed file."""
    path = target.with_name(target.name + ".error.json")
    body = {"file": display(target.name), "path": display(rel), "handler": handler}
    body.update(code=code, message=display(message), at=iso(at))
    atomic_write(path, json.dumps(body, ensure_ascii=False, indent=2).encode() + b"\n")
    return path


def progress(root: Path) -> list[dict[str, Any]]:
    """Every file still in the daemon's hands, from its durable state under ``root``
    (``state_dir/folders``): name, handler, state, total records and results in. Read
    without a daemon, so ``enrichd status`` on the same host shows it."""
    if not root.is_dir():
        return []
    out = []
    for entry in sorted(root.iterdir()):
        state = FileState(root, entry.name)
        meta = state.load()
        if meta is None:
            continue
        done = len(state.spooled()) if meta.state == ACCEPTED else 0
        out.append(
            {
                "file": display(meta.rel),
                "handler": meta.handler,
                "state": meta.state,
                "total": meta.records,
                "done": min(done, meta.records),
                "received_at": meta.received_at,
            }
        )
    return out
