"""Batch API files, pure: encode requests as JSONL, decode output and error lines into
per-request outcomes keyed by ``custom_id`` (whatever their order), and classify line
failures with the same taxonomy as sync calls."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from service.core import fastjson
from service.core.errors import ProviderError
from service.core.provider_errors import classify_status

# Non-HTTP line errors: the request never ran, so it can simply run again.
RETRYABLE_LINE_CODES = frozenset({"batch_expired", "batch_cancelled", "server_error", "rate_limit_exceeded"})


def custom_id(handler: str, item_id: str, intake_seq: int | None) -> str:
    """One request's id in batch files: valid on every provider ([A-Za-z0-9_-]{1,64}) and
    the same every time the same intake message is sent, so a provider-side count of
    custom ids shows whether any item was ever sent twice."""
    digest = hashlib.sha256(f"{handler}\0{item_id}\0{intake_seq}".encode()).hexdigest()
    return "i" + digest[:40]


def encode_line(cid: str, url: str, body: dict[str, Any]) -> bytes:
    line = {"custom_id": cid, "method": "POST", "url": url, "body": body}
    return fastjson.dumps(line) + b"\n"


def to_jsonl(requests: Iterable[tuple[str, dict[str, Any]]], *, url: str) -> bytes:
    """The whole input file from (custom_id, body) pairs: UTF-8 without BOM, one line each."""
    return b"".join(encode_line(cid, url, body) for cid, body in requests)


@dataclass(frozen=True)
class LineOk:
    body: dict[str, Any]


@dataclass(frozen=True)
class LineFailed:
    error: ProviderError


LineOutcome = LineOk | LineFailed


def parse_line(data: dict[str, Any]) -> tuple[str, LineOutcome] | None:
    """One output/error file line → (custom_id, outcome); None for lines without an id."""
    cid = data.get("custom_id")
    if not isinstance(cid, str):
        return None
    response = data.get("response")
    error = data.get("error")
    if isinstance(response, dict):
        status = response.get("status_code")
        body = response.get("body")
        if status == 200 and not error and isinstance(body, dict):
            return cid, LineOk(body)
        if isinstance(status, int) and status != 200:
            return cid, LineFailed(_http_failure(status, body))
    if isinstance(error, dict):
        code = str(error.get("code") or "batch_line_error")
        message = str(error.get("message") or code)
        if code in ("batch_expired", "batch_cancelled"):
            return cid, LineFailed(ProviderError(code, message, retryable=True))
        retryable = code in RETRYABLE_LINE_CODES
        return cid, LineFailed(
            ProviderError(
                "provider_error" if retryable else "bad_request", f"{code}: {message}", retryable=retryable
            )
        )
    return cid, LineFailed(
        ProviderError("provider_error", "the batch line has neither a response nor an error", retryable=True)
    )


def _http_failure(status: int, body: Any) -> ProviderError:
    err = body.get("error") if isinstance(body, dict) else None
    err = err if isinstance(err, dict) else {}
    code = err.get("code") if isinstance(err.get("code"), str) else None
    message = str(err.get("message") or f"HTTP {status}")
    return classify_status(status, code, message, None)


class LineReader:
    """Incremental JSONL parsing for files that arrive in chunks (lines may span chunks),
    so a large output file is never held whole."""

    def __init__(self) -> None:
        self._rest = b""

    def feed(self, chunk: bytes) -> list[tuple[str, LineOutcome]]:
        *lines, self._rest = (self._rest + chunk).split(b"\n")
        return list(_parse_many(lines))

    def finish(self) -> list[tuple[str, LineOutcome]]:
        rest, self._rest = self._rest, b""
        return list(_parse_many([rest])) if rest.strip() else []


def parse_lines(chunks: Iterable[bytes]) -> Iterator[tuple[str, LineOutcome]]:
    """Parse a JSONL file given as bytes chunks. Blank and unparsable lines are skipped:
    an item with no line is handled as missing."""
    reader = LineReader()
    for chunk in chunks:
        yield from reader.feed(chunk)
    yield from reader.finish()


def _parse_many(lines: list[bytes]) -> Iterator[tuple[str, LineOutcome]]:
    for raw in lines:
        if not raw.strip():
            continue
        try:
            data = fastjson.loads(raw)
        except ValueError:
            continue
        if isinstance(data, dict):
            parsed = parse_line(data)
            if parsed is not None:
                yield parsed
