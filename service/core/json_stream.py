"""A ``.json`` file read into items (for :mod:`service.core.formats`, CONTRACT §7). Pure: a
binary stream in, entries out. A top-level list is scanned incrementally, element by
element, from a sliding buffer (memory: about one element plus 64 KiB, not the whole
document); one object is read whole. What is no JSON raises :class:`FileFormatError` —
for a list lazily, when the iteration gets there, possibly after some elements."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any, BinaryIO

from service.core.entries import Entry, FileFormatError, LineError

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
