"""Reading files into items (CONTRACT §7, and ``enrichd submit``). Pure: a binary stream
in, item dicts out; every problem is a :class:`FileFormatError` with a code and a reason a
person can act on.

Each yielded entry is either an item dict or a :class:`LineError` (one bad line of a
``.jsonl``/``.csv``, one bad message of an ``.mbox``, fails that record, not the file).
``.jsonl``, ``.csv`` and ``.mbox`` are streamed record by record, so a large export is
never held in memory whole; so is a ``.json`` list, element by element
(:func:`~service.core.json_stream.json_stream_items`); the single-item formats are read whole (bounded by the
caller's size limit). A whole-file problem of ``.jsonl``/``.csv``/``.mbox`` is found
before their first record is yielded, or it is turned into a :class:`LineError`; a
``.json`` list that breaks (bad syntax, nesting too deep) raises
:class:`FileFormatError` when the reader gets there, possibly after some elements:
callers must not act on the entries before the iteration ended (the folder source and
``enrichd submit`` both read the whole file before publishing anything). Emails
(``.eml``, ``.mbox``) are parsed in :mod:`service.core.emails`."""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from pathlib import PurePath
from typing import Any, BinaryIO

from service.core.emails import email_item, mbox_items
from service.core.entries import Entry, FileFormatError, LineError
from service.core.json_stream import json_stream_items

_HEAD = 8192
_BOM_UTF8 = b"\xef\xbb\xbf"
_FIELD_BUDGET = 20_000  # characters of one front-matter field: guards against YAML alias bombs


def file_items(name: str, data: bytes) -> Iterator[Entry]:
    """Items of a file held in memory (``enrichd submit``)."""
    return iter_file(name, io.BytesIO(data))


def iter_file(name: str, stream: BinaryIO) -> Iterator[Entry]:
    """Items of one file, by suffix; ``stream`` must be seekable. Unknown suffixes are
    read as plain text. Raises FileFormatError (possibly lazily, before the first entry)."""
    suffix = PurePath(name).suffix.lower()
    encoding = sniff(stream, name)
    if suffix in (".eml", ".mbox"):
        return iter([email_item(stream.read())]) if suffix == ".eml" else mbox_items(stream)
    if suffix in (".jsonl", ".ndjson"):
        return jsonl_items(_lines(stream, encoding))
    if suffix == ".csv":
        return csv_items(_lines(stream, encoding))
    if suffix == ".json":
        return json_stream_items(stream, name, encoding)
    text = decode_text(stream.read(), name, encoding)
    if suffix in (".md", ".markdown"):
        return iter([note_item(name, text)])
    return iter([{"text": text.strip(), "source": "file"}])


def sniff(stream: BinaryIO, name: str) -> str:
    """The text encoding of a file from its first bytes (BOM, else UTF-8); refuses empty
    and binary files. Leaves the stream at its start."""
    head = stream.read(_HEAD)
    stream.seek(0)
    if not head:
        raise FileFormatError(f"{name} is empty", "empty_file")
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    if b"\x00" in head:
        raise FileFormatError(f"{name} looks binary (NUL bytes); expected UTF-8 text", "binary_file")
    return "utf-8-sig"


def decode_text(data: bytes, name: str, encoding: str = "utf-8-sig") -> str:
    try:
        text = data.decode(encoding)
    except UnicodeDecodeError as exc:
        raise FileFormatError(
            f"{name} is not UTF-8 (bad byte at offset {exc.start}); save it as UTF-8", "invalid_encoding"
        ) from None
    if not text.strip():
        raise FileFormatError(f"{name} holds only whitespace", "empty_file")
    return text


def _lines(stream: BinaryIO, encoding: str) -> Iterator[tuple[int, str | None, bytes]]:
    """(line number, text or None when the line is not valid UTF-8, raw bytes)."""
    if encoding == "utf-16":
        wrapper = io.TextIOWrapper(stream, encoding="utf-16", newline="")
        for number, line in enumerate(wrapper, 1):
            yield number, line, line.encode()
        return
    for number, raw in enumerate(stream, 1):
        if number == 1 and raw.startswith(_BOM_UTF8):
            raw = raw[len(_BOM_UTF8) :]
        try:
            yield number, raw.decode("utf-8"), raw
        except UnicodeDecodeError:
            yield number, None, raw


# -- notes ----------------------------------------------------------------------------------

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
    return {str(k): _flat(v, [_FIELD_BUDGET]) for k, v in data.items() if v is not None}, body


def _flat(value: Any, budget: list[int]) -> str:
    # ``budget`` is shared across the recursion: YAML aliases can make a small document
    # describe an exponentially large list, which must not be expanded.
    if budget[0] <= 0:
        return "…"
    if isinstance(value, list):
        out = ", ".join(_flat(v, budget) for v in value)
    elif isinstance(value, dict):
        out = ", ".join(f"{k}: {_flat(v, budget)}" for k, v in value.items())
    elif isinstance(value, bool):
        out = "true" if value else "false"
    else:
        out = str(value)
    budget[0] -= len(out) + 1
    return out


def note_item(name: str, text: str) -> dict[str, Any]:
    """A Markdown note: front matter → fields, plus ``title`` (the file name unless the
    front matter has one). A note that is only properties is enriched from them."""
    fields, body = split_front_matter(text)
    fields.setdefault("title", PurePath(name).stem)
    body = body.strip()
    if not body:
        lines = [fields["title"]] + [f"{k}: {v}" for k, v in fields.items() if k != "title" and v]
        body = "\n".join(lines)
    return {"text": body, "fields": fields, "source": "note"}


# -- records --------------------------------------------------------------------------------


def jsonl_items(lines: Iterator[tuple[int, str | None, bytes]]) -> Iterator[Entry]:
    for number, line, raw in lines:
        if line is None:
            yield LineError(number, "invalid_utf8", f"line {number} is not UTF-8", raw)
            continue
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            yield LineError(number, "invalid_json", f"line {number} is not JSON: {exc.msg}", raw)
            continue
        except RecursionError:
            yield LineError(number, "invalid_json", f"line {number} is nested too deeply", raw)
            continue
        except ValueError as exc:  # e.g. an integer of more than 4300 digits: this line only
            yield LineError(
                number, "invalid_json", f"line {number} is not JSON this daemon can read: {exc}", raw
            )
            continue
        if isinstance(record, dict):
            yield record
        else:
            yield LineError(number, "not_an_object", f"line {number} is not a JSON object", raw)


def csv_items(lines: Iterator[tuple[int, str | None, bytes]]) -> Iterator[Entry]:
    """Column ``text`` (any case) → text, the other named columns → fields. The
    delimiter is ``,``, ``;``, tab or ``|``: whichever makes ``text`` a header."""
    bad: set[int] = set()

    def texts() -> Iterator[str]:
        for number, line, raw in lines:
            if line is None:
                bad.add(number)
                line = raw.decode("utf-8", errors="replace")
            yield line

    source = texts()
    header_line = next(source, "")
    delimiter, header = _csv_header(header_line)
    csv.field_size_limit(max(csv.field_size_limit(), 64 * 1024 * 1024))
    return _csv_rows(csv.reader(source, delimiter=delimiter), header, bad)


def _csv_header(line: str) -> tuple[str, list[str]]:
    for delimiter in (",", ";", "\t", "|"):
        names = [name.strip() for name in next(csv.reader([line], delimiter=delimiter), [])]
        if "text" in (name.lower() for name in names):
            return delimiter, names
    raise FileFormatError("a CSV needs a header row with a 'text' column")


def _csv_rows(reader: Any, header: list[str], bad: set[int]) -> Iterator[Entry]:
    text_at = [name.lower() for name in header].index("text")
    previous = 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            previous = reader.line_num + 1
            yield LineError(reader.line_num + 1, "invalid_fields", f"line {reader.line_num + 1}: {exc}")
            continue
        line, first = reader.line_num + 1, previous + 1  # +1: the header line came first
        previous = line
        if not any(cell.strip() for cell in row):
            continue
        raw = ",".join(row).encode()
        if any(n in bad for n in range(first, line + 1)):
            yield LineError(line, "invalid_utf8", f"row at line {line} is not UTF-8", raw)
        elif len(row) > len(header):
            yield LineError(line, "invalid_fields", f"row at line {line} has more cells than the header", raw)
        else:
            fields = {name: value for name, value in zip(header, row, strict=False) if name}
            text = fields.pop(header[text_at], "")
            yield {"text": text, "fields": fields}


# -- names ----------------------------------------------------------------------------------

_TEMP_SUFFIXES = (
    "~",
    ".swp",
    ".swo",
    ".swx",
    ".tmp",
    ".temp",
    ".part",
    ".partial",
    ".crdownload",
    ".download",
    ".filepart",
    ".!ut",
)
_JUNK_NAMES = frozenset({"thumbs.db", "desktop.ini", "4913"})  # 4913: vim's write probe


def ignored_name(name: str) -> bool:
    """Names a watched folder never reads: dot-files (and dot-directories, which hold
    ``.done``/``.failed``), editor backups and swap files, partial downloads, OS junk."""
    lower = name.lower()
    return (
        lower.startswith((".", "~$"))
        or (lower.startswith("#") and lower.endswith("#"))
        or lower.endswith(_TEMP_SUFFIXES)
        or lower in _JUNK_NAMES
    )
