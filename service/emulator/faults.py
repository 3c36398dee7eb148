"""Which fault applies to a request or a batch. PURE: randomness comes in as numbers.

Markers are written into the last user message (or an embeddings input) by tests:

- ``[[emulator:status=NNN]]``   answer with HTTP NNN (400-599) and a proper error envelope
- ``[[emulator:invalid_json]]`` the model returns text that is not valid JSON
- ``[[emulator:refusal]]``      ``message.refusal`` set, ``content`` null
- ``[[emulator:context_length]]`` 400 ``context_length_exceeded``
- ``[[emulator:line_error=CODE]]`` (batches) a non-HTTP error line with ``error.code`` CODE
- ``[[emulator:flaky=N]]``      the first N requests (sync or batch lines) with this exact
  text get HTTP 500, later ones succeed: an item that keeps hitting transient errors

``[[emulator:pack_omit]]`` / ``[[emulator:pack_invalid]]`` act on one item of a packed
prompt and are handled in :mod:`.pack` (ignored here and outside packs).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .config import BatchFault, FaultConfig

MARKER_RE = re.compile(r"\[\[emulator:([a-z_]+)(?:=([A-Za-z0-9_.\-]+))?\]\]")
TIMEOUT = -1
"""Script entry meaning "sleep ``timeout_sleep_s`` before answering"."""


@dataclass(frozen=True)
class Markers:
    """Marker directives found in a request's text."""

    status: int | None = None
    invalid_json: bool = False
    refusal: bool = False
    context_length: bool = False
    line_error: str | None = None
    flaky: int | None = None

    @property
    def any(self) -> bool:
        return self != Markers()


def parse_markers(text: str) -> Markers:
    """Collect the markers in ``text``; unknown or malformed markers are ignored."""
    if "[[emulator:" not in text:
        return Markers()
    status: int | None = None
    flags: set[str] = set()
    line_error: str | None = None
    flaky: int | None = None
    for name, value in MARKER_RE.findall(text):
        if name == "status" and value.isdigit() and 400 <= int(value) <= 599:
            status = int(value)
        elif name == "line_error" and value:
            line_error = value
        elif name == "flaky" and value.isdigit():
            flaky = int(value)
        elif name in ("invalid_json", "refusal", "context_length"):
            flags.add(name)
    return Markers(
        status=status,
        invalid_json="invalid_json" in flags,
        refusal="refusal" in flags,
        context_length="context_length" in flags,
        line_error=line_error,
        flaky=flaky,
    )


def strip_markers(text: str) -> str:
    """``text`` without markers, so they never leak into generated content."""
    return MARKER_RE.sub("", text) if "[[emulator:" in text else text


@dataclass(frozen=True)
class SyncFault:
    """The fault chosen for one sync request: an HTTP status, a timeout, or nothing."""

    status: int | None = None
    timeout: bool = False
    source: str = "none"

    @property
    def injected(self) -> bool:
        return self.status is not None or self.timeout


NO_FAULT = SyncFault()


def decide_sync_fault(faults: FaultConfig, script_entry: int | None, draw: float) -> SyncFault:
    """Fault for one sync request.

    ``script_entry`` is the next scripted status (``None`` when the script is exhausted);
    a scripted 0 means "answer normally" and overrides the random rates. ``draw`` is one
    uniform number in [0, 1) from the emulator's seeded generator.
    """
    if script_entry is not None:
        if script_entry == 0:
            return NO_FAULT
        if script_entry == TIMEOUT:
            return SyncFault(timeout=True, source="script")
        return SyncFault(status=script_entry, source="script")
    threshold = 0.0
    for status, rate in ((TIMEOUT, faults.rate_timeout), (429, faults.rate_429), (500, faults.rate_500),
                         (503, faults.rate_503)):  # fmt: skip
        threshold += rate
        if rate > 0 and draw < threshold:
            if status == TIMEOUT:
                return SyncFault(timeout=True, source="rate_timeout")
            return SyncFault(status=status, source=f"rate_{status}")
    return NO_FAULT


@dataclass(frozen=True)
class BatchFaultPlan:
    """Everything that will go wrong with one batch, fixed when it is created."""

    fail_validation: bool = False
    token_limit: bool = False
    expire: bool = False
    expire_fraction: float = 0.5
    cancel_midway: bool = False
    create_500: bool = False
    line_error_rate: float = 0.0
    stuck_finalizing_s: float = 0.0
    forget: bool = False
    output_404: bool = False


def plan_batch_faults(faults: FaultConfig, next_fault: BatchFault | None) -> BatchFaultPlan:
    """Combine the standing batch faults with the one-shot ``next_fault`` for this batch."""
    return BatchFaultPlan(
        fail_validation=faults.batch_fail_validation or next_fault == "fail_validation",
        token_limit=next_fault == "token_limit",
        expire=faults.batch_expire or next_fault == "expire",
        expire_fraction=faults.batch_expire_fraction,
        cancel_midway=next_fault == "cancel",
        create_500=faults.batch_create_500_after_create or next_fault == "create_500",
        line_error_rate=faults.batch_line_error_rate,
        stuck_finalizing_s=faults.batch_stuck_finalizing_s,
        forget=next_fault == "forget",
        output_404=next_fault == "output_404",
    )


@dataclass(frozen=True)
class LineFault:
    """What happens to one batch line: an HTTP status, a non-HTTP error code, or nothing."""

    status: int | None = None
    error_code: str | None = None


def decide_line_fault(markers: Markers, line_error_rate: float, draw: float) -> LineFault:
    """Markers win over the random per-line error rate (which yields HTTP 500)."""
    if markers.line_error:
        return LineFault(error_code=markers.line_error)
    if markers.status is not None and markers.status != 200:
        return LineFault(status=markers.status)
    if line_error_rate > 0 and draw < line_error_rate:
        return LineFault(status=500)
    return LineFault()
