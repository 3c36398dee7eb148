"""The bounded retries of the folder source (pure): how long to wait before a failed step
of a file is tried again, and when to give the file up instead. A step that keeps
failing sends its file to ``inbox/.failed/``, so every dropped file ends in results or
in ``.failed/`` in bounded time (docs/folders.md)."""

from __future__ import annotations

RETRY_BASE_S = 2.0  # first wait after a failed step; doubles up to RETRY_MAX_S
RETRY_MAX_S = 300.0
TEMPORARY_ATTEMPTS = 12  # a step failing with a temporary OS error (about 25 min in all)
OTHER_ATTEMPTS = 4  # a step failing otherwise
DONE_EVENT_ATTEMPTS = 6  # file.done after the results file is written: then logged and dropped


def step_delay_s(failures: int, *, temporary: bool) -> float | None:
    """The wait before a step that has now failed ``failures`` times (this failure
    included) is tried again; None when it has failed too often (give the file up).
    ``temporary``: the failure is a temporary OS error (disk full, I/O error...), which
    gets more attempts."""
    limit = TEMPORARY_ATTEMPTS if temporary else OTHER_ATTEMPTS
    if failures >= limit:
        return None
    return min(RETRY_BASE_S * 2.0 ** (failures - 1), RETRY_MAX_S)


def done_event_delay_s(failures: int) -> float | None:
    """The wait before ``file.done`` is published again after ``failures`` failures (the
    results file is written already); None: log it and drop the event."""
    if failures >= DONE_EVENT_ATTEMPTS:
        return None
    return min(RETRY_BASE_S * 2.0**failures, RETRY_MAX_S)
