"""What was in flight at the last stop or crash, read back from the per-file state at
start-up (docs/folders.md has the crash analysis). A claim whose rename never happened is
dropped (the scan finds the file in the inbox again); a file under ``.processing/`` whose
state is gone (the state directory was wiped) goes to ``inbox/.failed/``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from service.sources.folders.claim import discard
from service.sources.folders.job import Job
from service.sources.folders.refuse import FailedFolder
from service.state.folder_files import ACCEPTED, READING, FileState


def recover(root: Path, processing: Path, failed: FailedFolder) -> tuple[int, list[tuple[Job, list[str]]]]:
    """(how many files were found, the jobs to resume in key order): each with the item
    ids it still awaits when it is ``accepted`` (else ``[]``). Blocking: run it in a thread."""
    keys = {p.name for p in root.iterdir() if p.is_dir()}
    keys |= {p.name for p in processing.iterdir() if p.is_dir()}
    jobs: list[tuple[Job, list[str]]] = []
    for key in sorted(keys):
        state = FileState(root, key)
        meta = state.load()
        if meta is None:
            _orphan(root, processing, key, failed)
            continue
        seqs = state.intake_seqs()
        job = Job(meta, state, seqs=seqs if meta.state == ACCEPTED else seqs or {})
        if meta.state == READING and not os.path.lexists(meta.source):
            discard(job, processing)  # the rename never happened: the scan finds it again
            continue
        jobs.append((job, state.waiting() if meta.state == ACCEPTED else []))
    return len(keys), jobs


def _orphan(root: Path, processing: Path, key: str, failed: FailedFolder) -> None:
    """Files under .processing whose state is gone (the state dir was wiped)."""
    folder = processing / key
    for path in folder.iterdir() if folder.is_dir() else ():
        message = "the daemon lost track of this file (state directory removed); drop it again"
        failed.put(path, Path(path.name), None, "state_lost", message)
    shutil.rmtree(folder, ignore_errors=True)
    FileState(root, key).remove()
