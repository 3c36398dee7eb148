"""Reading files into items (CONTRACT §7, and ``enrichd submit``). Pure: bytes in, item
dicts out; every problem is a :class:`FileFormatError` with a reason a person can act on.

Each yielded entry is either an item dict or a :class:`LineError` (one bad line of a
``.jsonl``/``.csv`` fails that line, not the file)."""

from __future__ import annotations

import csv
import email
import email.policy
import html
import io
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Any

TEXT_SUFFIXES = (".txt", ".md", ".markdown", ".text")


class FileFormatError(ValueError):
    """The whole file cannot be read."""


@dataclass(frozen=True)
class LineError:
    """One record of a multi-record file is bad; ``line`` is 1-based."""

    line: int
    code: str
    message: str


def decode_text(data: bytes, name: str) -> str:
    if b"\x00" in data[:8192]:
        raise FileFormatError(f"{name} looks binary (NUL bytes); expected UTF-8 text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise FileFormatError(f"{name} is not UTF-8 (bad byte at offset {exc.start})") from None
    return text


_FRONT_MATTER = re.compile(r"\A---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(\r?\n|\Z)", re.S)


def split_front_matter(text: str) -> tuple[dict[str, str], str]:
    """YAML front matter → flat string fields (lists joined with ", "), and the body."""
    match = _FRONT_MATTER.match(text)
    if not match:
        return {}, text
    import yaml

    try:
        data = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        raise FileFormatError(f"front matter is not valid YAML: {str(exc).splitlines()[0]}") from None
    body = text[match.end() :]
    if not isinstance(data, dict):
        return {}, body
    return {str(k): _flat(v) for k, v in data.items() if v is not None}, body


def _flat(value: Any) -> str:
    if isinstance(value, list):
        return ", ".join(_flat(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, ensure_ascii=False, default=str)
    return str(value)


def email_item(data: bytes) -> dict[str, Any]:
    """An RFC 822 message: its plain-text body (or de-tagged HTML) → text; subject,
    from, to, date → fields."""
    msg = email.message_from_bytes(data, policy=email.policy.default)
    if not isinstance(msg, EmailMessage):
        raise FileFormatError("not an email message")
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
        raise FileFormatError("the email has no readable text body")
    return {"text": text.strip(), "fields": fields, "source": "email"}


def _email_body(msg: EmailMessage) -> str:
    part = msg.get_body(preferencelist=("plain", "html"))
    if part is None:
        if msg.is_multipart():
            raise FileFormatError("the email has no text/plain or text/html part (broken MIME?)")
        part = msg
    try:
        content = part.get_content()
    except (LookupError, UnicodeError):
        # Unknown charset (e.g. X-UNKNOWN): decode the bytes as UTF-8, replacing what isn't.
        payload = part.get_payload(decode=True)
        content = payload.decode("utf-8", errors="replace") if isinstance(payload, bytes) else ""
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


def json_items(text: str) -> Iterator[dict[str, Any] | LineError]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"not valid JSON: {exc.msg} at line {exc.lineno}") from None
    records = data if isinstance(data, list) else [data]
    for i, record in enumerate(records, 1):
        if isinstance(record, dict):
            yield record
        else:
            yield LineError(i, "not_an_object", f"element {i} is not an object")


def jsonl_items(lines: Iterator[str]) -> Iterator[dict[str, Any] | LineError]:
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield LineError(number, "invalid_json", f"line {number} is not JSON: {exc.msg}")
            continue
        if isinstance(record, dict):
            yield record
        else:
            yield LineError(number, "not_an_object", f"line {number} is not a JSON object")


def csv_items(text: str) -> Iterator[dict[str, Any] | LineError]:
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames is None or "text" not in reader.fieldnames:
        raise FileFormatError("a CSV needs a header row with a 'text' column")
    for row in reader:
        line = reader.line_num
        if None in row:
            yield LineError(line, "invalid_fields", f"row at line {line} has more cells than the header")
            continue
        fields = {k: v for k, v in row.items() if k != "text" and v is not None and k}
        yield {"text": row.get("text") or "", "fields": fields}


def file_items(name: str, data: bytes) -> Iterator[dict[str, Any] | LineError]:
    """Items of one file, by suffix. Unknown suffixes are read as plain text."""
    lower = name.lower()
    if lower.endswith(".eml"):
        yield email_item(data)
        return
    if lower.endswith(".mbox"):
        yield from mbox_items(data)
        return
    text = decode_text(data, name)
    if lower.endswith(".jsonl") or lower.endswith(".ndjson"):
        yield from jsonl_items(iter(text.splitlines()))
    elif lower.endswith(".json"):
        yield from json_items(text)
    elif lower.endswith(".csv"):
        yield from csv_items(text)
    elif lower.endswith((".md", ".markdown")):
        fields, body = split_front_matter(text)
        yield {"text": body.strip(), "fields": fields, "source": "note"}
    else:
        yield {"text": text.strip(), "source": "file"}


def mbox_items(data: bytes) -> Iterator[dict[str, Any] | LineError]:
    """One item per message of an mbox (messages start with a ``From `` line)."""
    chunks = re.split(rb"(?m)^From [^\n]*\n", data)
    messages = [c for c in chunks if c.strip()]
    if not messages:
        raise FileFormatError("the mbox holds no messages")
    for number, chunk in enumerate(messages, 1):
        unescaped = re.sub(rb"(?m)^>(>*From )", rb"\1", chunk)
        try:
            yield email_item(unescaped)
        except FileFormatError as exc:
            yield LineError(number, "invalid_text", f"message {number}: {exc}")
