"""Names, modes and links of the watched-folder files on disk (docs/folders.md, "Names,
modes and links"): state files 0600 in 0700 folders, results files 0640 in 0750 folders;
folders opened without following symbolic links (:class:`open_dir`); files replaced
atomically (:func:`replace_at`, :func:`atomic_write`); names that fit NAME_MAX
(:func:`fit_name`) and do not collide (:func:`unique_path`); which OS errors are worth
retrying later (:func:`temporary`)."""

from __future__ import annotations

import errno
import hashlib
import os
import secrets
from pathlib import Path
from typing import IO, Any

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


class UnsafePathError(OSError):
    """A folder on the way to a results file is a symbolic link (or no folder): refused."""


def temporary(exc: BaseException) -> bool:
    """An OS error worth retrying later (disk full, I/O error, out of descriptors...)."""
    return isinstance(exc, OSError) and not isinstance(exc, UnsafePathError) and exc.errno in TEMPORARY_ERRNOS


def display(text: str) -> str:
    """A path as valid Unicode (names that are not UTF-8 keep a replacement character)."""
    return text.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


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
