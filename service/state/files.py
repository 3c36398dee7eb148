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
* ``dlq.jsonl``: DLQ entries of the records that failed locally (each bounded, see
  :func:`bound_dlq`).
* ``intake.tsv``: ``<key>\t<intake stream seq>``, appended (and fsynced) as intake
  PubAcks arrive: results are matched to the intake message they answer.

State files are 0600 and state folders 0700; results files 0640 in 0750 folders, created
without following symbolic links (docs/folders.md, "Names, modes and links").

The folder feature is local by nature (inbox and outbox are local directories), so its
bookkeeping lives beside them rather than in JetStream; every file here is either
written atomically or append-only with duplicates ignored, so a SIGKILL at any point
leaves something the next start can finish (docs/folders.md)."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import secrets
import shutil
import stat
from dataclasses import asdict, dataclass
from datetime import datetime
from pathlib import Path
from typing import IO, Any, BinaryIO

from handlers import HandlerSpec
from service.core.entries import FileFormatError, LineError
from service.core.errors import BadItemError, ErrorInfo
from service.core.events import Outcome, dlq_entry, iso, result_event
from service.core.formats import iter_file
from service.core.items import Priority, item_from_object, raw_id, salvage

STATE_FILE_MODE, STATE_DIR_MODE = 0o600, 0o700
RESULTS_FILE_MODE, RESULTS_DIR_MODE = 0o640, 0o750
NAME_MAX = 255  # bytes of one file name (Linux, macOS)
# OS errors that may go away by themselves: the operation is retried later, the file is not
# refused (a full disk must not turn into a file refused as unreadable).
TEMPORARY_ERRNOS = frozenset(
    {
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EIO,
        errno.EAGAIN,
        errno.EINTR,
        errno.ENOMEM,
        errno.EMFILE,
        errno.ENFILE,
        errno.EBUSY,
        errno.ETIMEDOUT,
        errno.ESTALE,
    }
)

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


class UnsafePathError(OSError):
    """A folder on the way to a results file is a symbolic link (or no folder): refused."""


def temporary(exc: BaseException) -> bool:
    """An OS error worth retrying later (disk full, I/O error, out of descriptors...)."""
    return isinstance(exc, OSError) and not isinstance(exc, UnsafePathError) and exc.errno in TEMPORARY_ERRNOS


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
        self.intake = self.dir / "intake.tsv"

    def make(self) -> None:
        self.dir.parent.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
        self.dir.mkdir(mode=STATE_DIR_MODE, exist_ok=True)

    def save(self, meta: FileMeta) -> None:
        atomic_write(self.meta_path, json.dumps(asdict(meta)).encode())

    def record_intake(self, seqs: list[tuple[str, int]]) -> None:
        """Remember the intake message of each published item; durable when this returns."""
        if not seqs:
            return
        with private_open(self.intake, "ab") as f:
            f.write(b"".join(f"{key}\t{seq}\n".encode() for key, seq in seqs))
            f.flush()
            os.fsync(f.fileno())

    def intake_seqs(self) -> dict[str, int] | None:
        """Item id → the intake seq its result must answer (the last one recorded); None
        for a state written before intake seqs were recorded (results match by id)."""
        try:
            f = self.intake.open("rb")
        except FileNotFoundError:
            return None
        with f:
            out: dict[str, int] = {}
            for line in f:
                key, _, seq = line.rstrip(b"\n").partition(b"\t")
                if line.endswith(b"\n") and seq.isdigit():
                    out[key.decode()] = int(seq)
            return out

    def load(self) -> FileMeta | None:
        try:
            return FileMeta(**json.loads(self.meta_path.read_bytes()))
        except (OSError, ValueError, TypeError):
            return None

    def append(self, lines: list[tuple[str, bytes]]) -> None:
        """Append results to the spool; durable when this returns."""
        with private_open(self.spool, "ab") as f:
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
            return f"!{n}", b"", _bad(_dumps(_shallow(entry)), None, exc.info(), cfg, meta)
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
    return _dumps(event), bound_dlq(dlq, cfg.max_item_bytes), error


def bound_dlq(entry: dict[str, Any], limit: int) -> bytes:
    """A DLQ entry as JSON of at most ``limit`` bytes: a long ``raw`` is cut (and
    ``truncated`` set), then anything else that is long. Always publishable."""
    data = _dumps(entry)
    raw = entry.get("raw")
    while len(data) > limit and isinstance(raw, str) and raw:
        raw = raw[: min(len(raw) // 2, limit // 2)]
        entry = {**entry, "raw": raw, "truncated": True}
        data = _dumps(entry)
    if len(data) > limit:
        keep = {k: entry.get(k) for k in ("id", "handler", "subject", "failed_at", "attempts")}
        error = entry.get("error") or {}
        keep["error"] = (
            {**error, "message": str(error.get("message", ""))[:500]} if isinstance(error, dict) else None
        )
        keep |= {"item": None, "raw": "", "truncated": True, "file": str(entry.get("file", ""))[:1000]}
        data = _dumps(keep)
    return data


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8", "replace")


def write_results(state: FileState, root: Path, parts: tuple[str, ...], name: str) -> dict[str, int]:
    """Write the results file ``root/<parts...>/name`` in input order, atomically;
    returns counts by outcome. The folders below ``root`` are created (0750) and never
    followed when they are symbolic links (:class:`UnsafePathError`)."""
    index: dict[bytes, tuple[int, int]] = {}
    with state.spool.open("rb") as spool:
        offset = 0
        for line in spool:
            key, _, rest = line.partition(b"\t")
            if line.endswith(b"\n") and key not in index:
                index[key] = (offset + len(key) + 1, len(rest))
            offset += len(line)
    counts = {"items": 0, "ok": 0, "error": 0, "cached": 0}
    with open_dir(root, parts) as folder:

        def lines(out: IO[bytes]) -> None:
            with state.manifest.open("rb") as manifest, state.spool.open("rb") as spool:
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

        replace_at(folder, name, lines, RESULTS_FILE_MODE)
    return counts


class open_dir:  # noqa: N801 - used as a context manager, like open()
    """A file descriptor of ``root/<parts...>``, each part created if missing and opened
    with ``O_NOFOLLOW`` relative to the one before: a symbolic link (or a file) planted
    anywhere below ``root`` raises :class:`UnsafePathError` and nothing is written
    through it, even when it is swapped in between two checks."""

    def __init__(self, root: Path, parts: tuple[str, ...]) -> None:
        self.root, self.parts = root, parts
        self.fd = -1

    def __enter__(self) -> int:
        self.fd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        try:
            for part in self.parts:
                try:
                    os.mkdir(part, RESULTS_DIR_MODE, dir_fd=self.fd)
                except FileExistsError:
                    pass
                try:
                    child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=self.fd)
                except OSError as exc:
                    if exc.errno in (errno.ELOOP, errno.ENOTDIR):
                        where = display(str(Path(self.root, *self.parts[: self.parts.index(part) + 1])))
                        raise UnsafePathError(
                            exc.errno, f"{where} is a symbolic link or no folder; not followed"
                        ) from None
                    raise
                os.close(self.fd)
                self.fd = child
        except BaseException:
            os.close(self.fd)
            raise
        return self.fd

    def __exit__(self, *_exc: object) -> None:
        os.close(self.fd)


def replace_at(folder: int, name: str, write: Any, mode: int) -> None:
    """``name`` in the folder open as ``folder``: written to a short hidden temporary
    name (never longer than NAME_MAX, whatever ``name`` is), fsynced, renamed over."""
    tmp = f".tmp-{os.getpid()}-{secrets.token_hex(4)}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode, dir_fd=folder)
    try:
        with os.fdopen(fd, "wb") as out:
            write(out)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, name, src_dir_fd=folder, dst_dir_fd=folder)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=folder)
        except OSError:
            pass
        raise
    os.fsync(folder)


def fit_name(name: str, suffix: str = "", reserve: int = 0) -> str:
    """``name + suffix``, or when that (plus ``reserve`` bytes) would pass NAME_MAX, a
    shortened name that is the same for the same input: the longest prefix of ``name``
    that fits, ``~``, 10 hex digits of the SHA-256 of the whole name, its extension (if
    short), then ``suffix``."""
    raw = os.fsencode(name)
    budget = NAME_MAX - reserve - len(os.fsencode(suffix))
    if len(raw) <= budget:
        return name + suffix
    digest = "~" + hashlib.sha256(raw).hexdigest()[:10]
    stem, dot, ext = name.rpartition(".")
    tail = dot + ext if dot and stem and len(os.fsencode(dot + ext)) <= 16 else ""
    keep = budget - len(digest) - len(os.fsencode(tail))
    prefix = name[: len(stem) if tail else len(name)]
    while len(os.fsencode(prefix)) > keep:  # cut on characters, not inside one
        prefix = prefix[: max(0, min(len(prefix) - 1, keep))]
    return prefix + digest + tail + suffix


# -- moving files around ---------------------------------------------------------------------


def atomic_write(path: Path, data: bytes, mode: int = STATE_FILE_MODE) -> None:
    """``path`` replaced by ``data`` (temporary file, fsync, rename, fsync the folder)."""
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    try:
        replace_at(fd, path.name, lambda out: out.write(data), mode)
    finally:
        os.close(fd)


def private_open(path: Path, mode: str) -> IO[bytes]:
    """``open(path, mode)`` (binary) creating the file 0600."""
    return open(path, mode, opener=lambda p, flags: os.open(p, flags, STATE_FILE_MODE))  # noqa: SIM115


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


_ERROR_SUFFIX = ".error.json"


def unique_path(folder: Path, name: str) -> Path:
    """``folder/name``, or ``folder/stem (2).ext`` ... when that is taken. A name too
    long to take ``.error.json`` (and `` (n)``) is shortened first (:func:`fit_name`)."""
    n = 1
    while True:
        candidate = folder / _numbered(name, n)
        if not os.path.lexists(candidate) and not os.path.lexists(f"{candidate}{_ERROR_SUFFIX}"):
            return candidate
        n += 1


def _numbered(name: str, n: int) -> str:
    if n == 1:
        return fit_name(name, reserve=len(_ERROR_SUFFIX))
    stem, dot, ext = name.rpartition(".") if "." in name.lstrip(".") else (name, "", "")
    tail = f" ({n}){dot}{ext}"
    return fit_name(stem, reserve=len(os.fsencode(tail)) + len(_ERROR_SUFFIX)) + tail


def move_into(folder: Path, path: Path) -> Path:
    """Move ``path`` (a file, or the link itself for a symlink) into ``folder``."""
    folder.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
    target = unique_path(folder, path.name)
    os.rename(path, target)
    return target


def write_error(
    target: Path, *, rel: str, handler: str | None, code: str, message: str, at: datetime
) -> Path:
    """``<file>.error.json`` beside a failed file."""
    path = target.with_name(target.name + ".error.json")
    body = {"file": display(target.name), "path": display(rel), "handler": handler}
    text = display(message)
    body.update(code=code, message=text if len(text) <= 4000 else text[:4000] + "…", at=iso(at))
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
