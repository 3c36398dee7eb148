"""Permanent provider failures on the batch path (issue 10): how long to keep trying, and
how a flush ends when they last. PURE: the time (Unix seconds) comes in.

A transient failure (5xx, 429, timeout, connection) is retried at the next poll as
before. A permanent one (the provider's answer says trying again will not help:
``auth_failed``, ``permission_denied``, ``not_found``, ``bad_request``) is alerted at
once, retried with an exponential back-off, and once it has lasted ``give_up_after_s``
the flush ends:

- the batch is unknown to the provider (``not_found`` while following it) or its output
  file is gone (``not_found`` while downloading): its results are lost, so the same flush
  is submitted again as a new batch, until ``max_lost`` batches were lost; then every item
  ends with ``batch_lost`` (retryable: ``enrichd dlq replay`` sends it again);
- anything else (a 401 on upload, a 403 on create, ...): every item ends with the
  provider's code (e.g. ``auth_failed``, not retryable) and goes to the DLQ.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Step = Literal["submit", "follow", "download"]
"""Which provider call failed: upload/create/find, retrieve, or reading the result files."""

MAX_BACKOFF_S = 300.0

_STEP_WORDS: dict[str, str] = {
    "submit": "submitting the batch",
    "follow": "following the batch",
    "download": "downloading the batch's result files",
}


def is_permanent(retryable: bool) -> bool:
    """A provider error that waiting alone will not fix (classified at the provider edge)."""
    return not retryable


@dataclass(frozen=True)
class Fault:
    """A run of permanent failures of one step of one flush (kept in its batch record)."""

    step: str
    code: str
    since: float
    count: int


@dataclass(frozen=True)
class Retry:
    retry_at: float
    fault: Fault
    first: bool  # the run just began: alert now


@dataclass(frozen=True)
class Resubmit:
    """Submit the same flush again as a new batch (the old one's results are lost)."""

    reason: str


@dataclass(frozen=True)
class End:
    """End every item of the flush with this error (result event + DLQ)."""

    code: str
    message: str
    retryable: bool


Decision = Retry | Resubmit | End


def backoff_s(base_s: float, count: int) -> float:
    """The wait after the ``count``-th failure in a row (1, 2, ...): doubling, capped."""
    return min(MAX_BACKOFF_S, base_s * float(2 ** min(max(count - 1, 0), 16)))


def on_permanent_failure(
    step: Step,
    code: str,
    message: str,
    *,
    current: Fault | None,
    now: float,
    give_up_after_s: float,
    base_s: float,
    lost_batches: int,
    max_lost: int,
) -> Decision:
    """What to do after a permanent failure of ``step``. ``current``: the run of failures
    so far (None, or a run of another step or code: a new run starts). ``lost_batches``:
    how many batches of this flush the provider lost before."""
    if current is None or current.step != step or current.code != code:
        fault = Fault(step, code, now, 1)
        first = True
    else:
        fault = Fault(step, code, current.since, current.count + 1)
        first = False
    deadline = fault.since + give_up_after_s
    if now < deadline:
        return Retry(min(now + backoff_s(base_s, fault.count), deadline), fault, first)
    lasted = f"{now - fault.since:.0f}s"
    if code == "not_found" and step in ("follow", "download"):
        what = "the batch" if step == "follow" else "the batch's output file"
        if lost_batches + 1 < max_lost:
            return Resubmit("batch_lost" if step == "follow" else "output_lost")
        return End(
            "batch_lost",
            f"the provider lost {what} ({lasted} of 404s), also after resubmitting the items in "
            f"{lost_batches + 1} batches: {message}",
            True,
        )
    return End(code, f"gave up {_STEP_WORDS[step]} after {lasted} of {code} answers: {message}", False)
