"""Step 2, *claim*, of the life of a dropped file (:mod:`service.sources.folders`), and
the moves at its end: a file is refused if any part of its path is a symbolic link, it
is no regular file, too large, empty, or its subfolder is no handler; else its state is
saved and it is renamed into ``inbox/.processing/<key>/``, out of everyone's way. At the
end it goes to ``inbox/.done/`` (:func:`retire`), its results to
``outbox/<handler>/...`` (:func:`results_place`)."""

from __future__ import annotations

import os
import shutil
import stat
from collections.abc import Collection
from pathlib import Path

from service.core.entries import FileFormatError
from service.sources.folders.job import Job
from service.sources.folders.read import check_regular
from service.state.folder_files import FileMeta
from service.state.safe_paths import STATE_DIR_MODE, fit_name, move_into


def check(
    inbox: Path, path: Path, *, handlers: Collection[str], default_handler: str, max_file_bytes: int
) -> tuple[str, Path, FileFormatError | None]:
    """(handler, the path to act on, why it is refused or None); raises
    FileNotFoundError when the file is gone."""
    rel = path.relative_to(inbox)
    handler = rel.parts[0] if len(rel.parts) > 1 else default_handler
    current = inbox
    for part in rel.parts:
        current = current / part
        st = os.lstat(current)
        if stat.S_ISLNK(st.st_mode):  # never followed: the link itself is moved away
            return handler, current, FileFormatError("symbolic links are not followed", "symlink")
    if handler not in handlers:
        message = f"no handler named {handler!r}; known: {', '.join(sorted(handlers))}"
        return handler, path, FileFormatError(message, "unknown_handler")
    try:
        check_regular(st, max_file_bytes)
    except FileFormatError as exc:
        return handler, path, exc
    return handler, path, None


def claim(job: Job, path: Path) -> None:
    """Save the file's state (first, so that after a crash the rename can be traced),
    then rename it to its claimed place ``job.meta.source``."""
    job.state.make()
    job.state.save(job.meta)
    source = Path(job.meta.source)
    source.parent.mkdir(mode=STATE_DIR_MODE, parents=True, exist_ok=True)
    os.rename(path, source)


def discard(job: Job, processing: Path) -> None:
    """Drop a claim: the file's state and its folder under ``.processing/``."""
    job.state.remove()
    shutil.rmtree(processing / job.meta.key, ignore_errors=True)


def retire(job: Job, inbox: Path) -> None:
    """The claimed file to ``inbox/.done/`` (recorded in its state), its folder under
    ``.processing/`` removed; repeated harmlessly."""
    source = Path(job.meta.source)
    if job.meta.moved_to is None and os.path.lexists(source):
        job.meta.moved_to = str(move_into(inbox / ".done", source))
        job.state.save(job.meta)
    shutil.rmtree(source.parent, ignore_errors=True)


def results_place(outbox: Path, meta: FileMeta) -> tuple[Path, tuple[str, ...], str]:
    """Where the results file goes: (outbox, (handler, the folders below), its name)
    — a name that would pass 255 bytes is shortened (:func:`fit_name`)."""
    rel = Path(meta.rel)
    inner = rel.parts[1:] if len(rel.parts) > 1 else rel.parts
    return outbox, (meta.handler, *inner[:-1]), fit_name(inner[-1], ".results.jsonl")
