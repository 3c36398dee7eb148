"""Reading emails into items, for :mod:`service.core.formats` (CONTRACT §7). Pure: an
RFC 822 message (a ``.eml`` file) becomes one item — its plain-text body, or de-tagged
HTML, as text; subject, from, to and date as fields — and an ``.mbox`` is streamed
message by message, a bad message failing as a :class:`LineError`, not the file. Broken
MIME (a multipart whose declared boundary never occurs, an unknown charset) is read as
well as it can be; a message with no readable text is a :class:`FileFormatError`."""

from __future__ import annotations

import email
import email.policy
import html
import re
from collections.abc import Iterator
from email.message import EmailMessage
from typing import Any, BinaryIO

from service.core.entries import Entry, FileFormatError, LineError


def email_item(data: bytes) -> dict[str, Any]:
    """An RFC 822 message: its plain-text body (or de-tagged HTML) → text; subject,
    from, to, date → fields."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    if not isinstance(msg, EmailMessage):
        raise FileFormatError("not an email message")
    msg = _repair_boundary(msg)
    fields: dict[str, str] = {}
    for header in ("subject", "from", "to", "date"):
        try:
            value = msg.get(header)
        except Exception:  # noqa: BLE001 - a malformed header is skipped, not fatal
            value = None
        if value:
            fields[header] = str(value).strip()
    text = _email_body(msg)
    if not text.strip():
        raise FileFormatError("the email has no readable text body", "no_items")
    return {"text": text.strip(), "fields": fields, "source": "email"}


_BOUNDARY_LINE = re.compile(r"^--([^\s-][^\s]{0,69})\s*$", re.M)


def _repair_boundary(msg: EmailMessage) -> EmailMessage:
    """A multipart whose declared boundary never occurs (a common export bug) is parsed
    as one opaque string; re-parse it with the boundary its body actually uses."""
    if msg.get_content_maintype() != "multipart" or msg.is_multipart():
        return msg
    payload = msg.get_payload()
    found = _BOUNDARY_LINE.search(payload) if isinstance(payload, str) else None
    if found is None:
        return msg
    try:
        msg.set_boundary(found.group(1))
        repaired = email.message_from_string(msg.as_string(), policy=email.policy.default)
    except Exception:  # noqa: BLE001 - keep the unrepaired message
        return msg
    return repaired if isinstance(repaired, EmailMessage) and repaired.is_multipart() else msg


def _email_body(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("plain", "html"))
    if part is None:
        payload = msg.get_payload()
        if isinstance(payload, str):  # broken MIME we could not repair: the raw body
            text = payload.encode("ascii", "surrogateescape").decode("utf-8", "replace")
            return html_to_text(text) if "<html" in text.lower() else text
        raise FileFormatError("the email has no text/plain or text/html part to read", "no_items")
    try:
        content = part.get_content()
    except (LookupError, UnicodeError):
        # Unknown charset (e.g. X-UNKNOWN): decode the bytes as UTF-8, replacing what isn't.
        raw = part.get_payload(decode=True)
        content = raw.decode("utf-8", errors="replace") if isinstance(raw, bytes) else ""
    if not isinstance(content, str):
        raise FileFormatError("the email body is not text")
    if part.get_content_type() == "text/html":
        content = html_to_text(content)
    return content


def html_to_text(markup: str) -> str:
    markup = re.sub(r"(?is)<(script|style).*?</\1>", " ", markup)
    markup = re.sub(r"(?i)<br\s*/?>|</p>|</div>|</li>", "\n", markup)
    text = html.unescape(re.sub(r"<[^>]+>", " ", markup))
    return re.sub(r"[ \t]+", " ", re.sub(r"\n\s*\n+", "\n\n", text)).strip()


def mbox_items(stream: BinaryIO) -> Iterator[Entry]:
    """One item per message of an mbox (messages start with a ``From `` line), one
    message in memory at a time."""
    first = stream.readline()
    if not first.startswith(b"From "):
        raise FileFormatError("not an mbox: the first line must start with 'From '")
    return _mbox_messages(stream)


def _mbox_messages(stream: BinaryIO) -> Iterator[Entry]:
    number, lines = 1, list[bytes]()
    for raw in stream:
        if raw.startswith(b"From "):
            yield _mbox_message(number, lines)
            number, lines = number + 1, []
        else:
            lines.append(raw[1:] if re.match(rb">+From ", raw) else raw)
    yield _mbox_message(number, lines)


def _mbox_message(number: int, lines: list[bytes]) -> Entry:
    data = b"".join(lines)
    try:
        return email_item(data)
    except FileFormatError as exc:
        return LineError(number, "invalid_text", f"message {number}: {exc}", data[:4096])
