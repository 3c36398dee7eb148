"""A claimed file as the folder source works on it: shared by the source, the result
collector and the publisher (:mod:`service.sources.folders`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from service.state.folder_files import FileMeta, FileState


@dataclass(eq=False)
class Job:
    """A claimed file: its durable state, and the item ids whose results it still awaits."""

    meta: FileMeta
    state: FileState
    remaining: set[str] = field(default_factory=set)
    # item id → the intake seq of the message this file published for it (its result
    # answers that one); None: an older state without intake seqs, results match by id
    seqs: dict[str, int] | None = field(default_factory=dict)
    finishing: bool = False
    counts: dict[str, int] = field(default_factory=dict)
    failures: int = 0  # of the current step, for the bounded retries
    written: bool = False  # the results file is written (finish: only file.done is left)
