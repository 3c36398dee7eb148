"""Refused and abandoned files: moved to ``inbox/.failed/`` beside ``<name>.error.json``
(its reason and code, docs/folders.md). A file that cannot even be moved is held: the
watcher leaves it alone, and the reason is in the log."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from service.core.events import iso
from service.state.safe_paths import atomic_write, display, move_into

log = logging.getLogger("enrichd.folders")


class FailedFolder:
    """``inbox/.failed/``; ``hold(path)`` is called for a file that cannot be moved."""

    def __init__(self, inbox: Path, hold: Callable[[Path], None]) -> None:
        self.folder = inbox / ".failed"
        self._hold = hold

    def put(self, victim: Path, rel: Path, handler: str | None, code: str, message: str) -> Path | None:
        """Move a file to ``inbox/.failed/`` beside ``<name>.error.json``; where it went."""
        try:
            target = move_into(self.folder, victim)
        except OSError as exc:
            self._hold(victim)
            log.error("cannot move a refused file", extra={"file": display(str(rel)), "error": str(exc)})
            return None
        extra = {"file": display(str(rel)), "code": code, "reason": display(message)}
        try:
            write_error(
                target, rel=str(rel), handler=handler, code=code, message=message, at=datetime.now(UTC)
            )
        except OSError as exc:  # the file is in .failed/; its reason is in the log
            log.error("cannot write the error file of a refused file", extra=extra | {"error": str(exc)})
        log.warning("file refused", extra=extra | {"moved_to": display(str(target))})
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
