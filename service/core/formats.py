"""Reading files into items (CONTRACT §7, and ``enrichd submit``). Pure: a binary stream
in, item dicts out; every problem is a :class:`FileFormatError` with a code and a reason a
person can act on.

Each yielded entry is either an item dict or a :class:`LineError` (one bad line of a
``.jsonl``/``.csv``, one bad message of an ``.mbox``, fails that record, not the file).
``.jsonl``, ``.csv`` and ``.mbox`` are streamed record by record, so a large export is
never held in memory whole; so is a ``.json`` list, element by element
(:func:`json_stream_items`); the single-item formats are read whole (bounded by the
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


_JSON_CHUNK = 64 * 1024
_WS = " \t\n\r"
_DECODER = json.JSONDecoder()


def json_stream_items(stream: BinaryIO, name: str, encoding: str = "utf-8-sig") -> Iterator[Entry]:
    """A ``.json`` file read incrementally: one object, or a top-level list whose
    elements are decoded one at a time from a sliding buffer (memory: about one element
    plus 64 KiB, not the whole document). Same answers as :func:`json_items` on the
    whole text; raises FileFormatError (lazily, from the iteration) for what is no JSON."""
    reader = _JsonText(stream, name, encoding)
    first = reader.peek()
    if first == "[":
        reader.pos += 1
        return _json_list(reader)
    return json_items(reader.rest())  # one object (or junk): read whole, as the single-item formats


class _JsonText:
    """Decoded text of a binary stream, fed on demand; ``buf[pos:]`` is unread."""

    def __init__(self, stream: BinaryIO, name: str, encoding: str) -> None:
        import codecs

        self._stream, self._name = stream, name
        self._decoder = codecs.getincrementaldecoder(encoding)(errors="strict")
        self._offset = 0  # bytes read
        self.buf, self.pos, self.eof = "", 0, False
        self.line = 1  # line number of buf[0]

    def more(self, at_least: int = _JSON_CHUNK) -> None:
        """Read at least ``at_least`` more bytes (sets ``eof`` at the end of the file);
        drops the consumed text first, so positions into ``buf`` change: re-read ``pos``."""
        if self.eof:
            return
        if self.pos:
            self.line += self.buf.count("\n", 0, self.pos)
            self.buf, self.pos = self.buf[self.pos :], 0
        data = self._stream.read(max(at_least, _JSON_CHUNK))
        try:
            self.buf += self._decoder.decode(data, final=not data)
        except UnicodeDecodeError as exc:
            at = self._offset + exc.start
            raise FileFormatError(
                f"{self._name} is not UTF-8 (bad byte at offset {at}); save it as UTF-8", "invalid_encoding"
            ) from None
        self._offset += len(data)
        self.eof = not data

    def peek(self) -> str:
        """The next character that is not whitespace ("" at the end), pos moved onto it."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if self.eof:
                return ""
            self.more()

    def rest(self) -> str:
        while not self.eof:
            self.more(1 << 20)
        text = self.buf[self.pos :]
        if not text.strip():
            raise FileFormatError(f"{self._name} holds only whitespace", "empty_file")
        return text

    def error(self, what: str, pos: int) -> FileFormatError:
        line = self.line + self.buf.count("\n", 0, pos)
        return FileFormatError(f"not valid JSON: {what} at line {line}")


def _json_list(reader: _JsonText) -> Iterator[Entry]:
    n = 0
    while True:
        c = reader.peek()
        if c == "]" and n == 0:
            raise FileFormatError("the list of items is empty", "no_items")
        if c == "":
            raise reader.error("Expecting value", reader.pos)
        n += 1
        record = _next_element(reader)
        if isinstance(record, dict):
            yield record
        else:
            raw = json.dumps(record, ensure_ascii=False).encode()
            yield LineError(n, "not_an_object", f"element {n} is not an object", raw)
        sep = reader.peek()
        reader.pos += 1
        if sep == "]":
            break
        if sep != ",":
            raise reader.error("Expecting ',' delimiter", reader.pos - 1)
    if reader.peek() != "":
        raise reader.error("Extra data", reader.pos)


def _next_element(reader: _JsonText) -> Any:
    """Decode the element at ``reader.pos``; it counts only once the character after it
    is in the buffer too (a number cut by the buffer's end would read as a shorter one).
    When the buffer is too short the read size doubles, so a large element costs O(size)."""
    while True:
        try:
            value, end = _DECODER.raw_decode(reader.buf, reader.pos)
        except json.JSONDecodeError as exc:
            if reader.eof:
                raise reader.error(exc.msg, exc.pos) from None
            reader.more(len(reader.buf))
            continue
        except RecursionError:
            raise FileFormatError("not valid JSON: nested too deeply") from None
        except ValueError as exc:  # e.g. an integer of more than 4300 digits
            raise FileFormatError(f"not JSON this daemon can read: {exc}") from None
        after = end
        while after < len(reader.buf) and reader.buf[after] in _WS:
            after += 1
        if after < len(reader.buf) or reader.eof:
            reader.pos = end
            return value
        reader.more(len(reader.buf))


def json_items(text: str) -> Iterator[Entry]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise FileFormatError(f"not valid JSON: {exc.msg} at line {exc.lineno}") from None
    except RecursionError:
        raise FileFormatError("not valid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer of more than 4300 digits
        raise FileFormatError(f"not JSON this daemon can read: {exc}") from None
    if not isinstance(data, dict | list):
        raise FileFormatError("a .json file must hold an item (an object) or a list of items")
    records = data if isinstance(data, list) else [data]
    if not records:
        raise FileFormatError("the list of items is empty", "no_items")
    return _json_records(records)


def _json_records(records: list[Any]) -> Iterator[Entry]:
    for i, record in enumerate(records, 1):
        if isinstance(record, dict):
            yield record
        else:
            raw = json.dumps(record, ensure_ascii=False).encode()
            yield LineError(i, "not_an_object", f"element {i} is not an object", raw)


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
