"""Reading files into items (service/core/formats.py): every format of CONTRACT §7, the
encodings and breakages real exports have, and streaming of large files. Pure."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import pytest

from service.core.entries import FileFormatError, LineError
from service.core.formats import file_items, ignored_name, iter_file
from tests.conftest import FIXTURES

NASTY = FIXTURES / "nasty"


def entries(name: str, data: bytes | str) -> list[Any]:
    return list(file_items(name, data.encode() if isinstance(data, str) else data))


def only(name: str, data: bytes | str) -> dict[str, Any]:
    [entry] = entries(name, data)
    assert isinstance(entry, dict)
    return entry


def summary(found: list[Any]) -> list[Any]:
    """Each entry as its text, or as the code of its LineError."""
    return [e.code if isinstance(e, LineError) else e["text"] for e in found]


# -- one item per file -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "text", "fields", "source"),
    [
        ("a.txt", "  hello world \n", "hello world", None, "file"),
        ("a.log", "any other suffix is text", "any other suffix is text", None, "file"),
        ("n.md", "# Title\n\nBody", "# Title\n\nBody", {"title": "n"}, "note"),
        (
            "n.md",
            "---\ntitle: Q3\ntags: [a, b]\ndate: 2023-09-12\ndraft: true\nnone:\n---\nBody\n",
            "Body",
            {"title": "Q3", "tags": "a, b", "date": "2023-09-12", "draft": "true"},
            "note",
        ),
        ("n.markdown", "---\nloc:\n  city: Kyoto\n---\nx", "x", {"loc": "city: Kyoto", "title": "n"}, "note"),
        (
            "props.md",
            "---\nrating: 7\nempty: []\n---\n",
            "props\nrating: 7",
            {"rating": "7", "empty": ""},
            "note",
        ),
        ("a.json", '{"id": "x1", "text": "t", "fields": {"k": "v"}}', "t", {"k": "v"}, None),
        ("bom.txt", b"\xef\xbb\xbfwith a BOM", "with a BOM", None, "file"),
        ("u16.txt", "UTF-16 text é".encode("utf-16"), "UTF-16 text é", None, "file"),
    ],
)
def test_single_item_formats(
    name: str, data: str | bytes, text: str, fields: dict[str, str] | None, source: str | None
) -> None:
    item = only(name, data)
    assert item["text"] == text
    if fields is not None:
        assert {k: item["fields"].get(k) for k in fields} == fields
    assert item.get("source") == source


@pytest.mark.parametrize(
    ("name", "data", "code"),
    [
        ("empty.txt", b"", "empty_file"),
        ("blank.md", " \n\t\n", "empty_file"),
        ("bin.txt", b"abc\x00\x01\x02", "binary_file"),
        ("bin.jsonl", b'{"text": "a"}\n\x00\x00', "binary_file"),
        ("latin1.txt", "café".encode("latin-1"), "invalid_encoding"),
        ("bad.json", "{nope", "invalid_format"),
        ("scalar.json", '"just a string"', "invalid_format"),
        ("none.json", "[]", "no_items"),
        ("deep.json", "[" * 50_000 + "]" * 50_000, "invalid_format"),
        ("trailing.json", '[{"text": "a"}] and more', "invalid_format"),
        ("unclosed.json", '[{"text": "a"}, {"text": "b"}', "invalid_format"),
        ("nocomma.json", '[{"text": "a"} {"text": "b"}]', "invalid_format"),
        ("bigint.json", '[{"text": "a", "metadata": {"n": ' + "9" * 5000 + "}}]", "invalid_format"),
        ("latin1.json", '[{"text": "caf\xe9"}]'.encode("latin-1"), "invalid_encoding"),
        ("fm.md", "---\ntitle: [unclosed\n---\nbody", "invalid_format"),
        ("x.csv", "title,body\na,b\n", "invalid_format"),
        ("x.mbox", "Subject: not an mbox\n\nbody", "invalid_format"),
    ],
)
def test_unreadable_files_say_why(name: str, data: str | bytes, code: str) -> None:
    with pytest.raises(FileFormatError) as caught:
        entries(name, data)
    assert caught.value.code == code
    assert str(caught.value)


def test_front_matter_alias_bomb_is_bounded() -> None:
    item = only("bomb.md", (NASTY / "alias-bomb.md").read_bytes())
    assert item["text"] == "A note with an alias bomb."
    assert sum(len(v) for v in item["fields"].values()) < 100_000


# -- email --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted((FIXTURES / "emails").glob("*.eml")), ids=lambda p: p.name)
def test_sample_emails_have_text_subject_and_sender(path: Path) -> None:
    item = only(path.name, path.read_bytes())
    assert item["text"].strip() and item["source"] == "email"
    assert item["fields"]["subject"] and "@" in item["fields"]["from"]


@pytest.mark.parametrize(
    ("fixture", "text", "subject"),
    [
        (
            "x-unknown-charset.eml",
            "The caf\ufffd menu for next week is attached in spirit.",
            "Caf\ufffd menu",
        ),
        ("broken-boundary.eml", "The real body uses another boundary.", "Boundary mismatch"),
        ("missing-boundary.eml", "A multipart message whose body has no parts at all.", "No boundary at all"),
    ],
)
def test_broken_emails_are_salvaged(fixture: str, text: str, subject: str) -> None:
    item = only(fixture, (NASTY / fixture).read_bytes())
    assert item["text"] == text
    assert item["fields"]["subject"] == subject


def test_html_only_email_is_detagged() -> None:
    head = b"From: a@b.c\nSubject: h\nContent-Type: text/html\n\n"
    data = head + b"<p>Hello&nbsp;<b>there</b></p><script>x()</script>"
    assert only("h.eml", data)["text"] == "Hello\xa0 there"


def test_email_without_a_text_part_is_refused() -> None:
    with pytest.raises(FileFormatError) as caught:
        entries("a.eml", (NASTY / "attachment-only.eml").read_bytes())
    assert caught.value.code == "no_items"


def test_mbox_yields_one_item_per_message_and_fails_only_the_bad_one() -> None:
    found = entries("box.mbox", (NASTY / "two-messages.mbox").read_bytes())
    assert summary(found) == [
        "Hello from the first message.\nFrom the archive, with love.",
        "invalid_text",
        "Third message body.",
    ]
    assert found[0]["fields"]["from"] == "Alice <alice@example.com>"


# -- records ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "data", "expected"),
    [
        ("a.jsonl", '{"text": "a"}\n\n{"text": "b"}', ["a", "b"]),
        ("a.ndjson", '{"text": "a"}\r\n', ["a"]),
        ("a.jsonl", b'\xef\xbb\xbf{"text": "bom"}\n', ["bom"]),
        (
            "a.jsonl",
            '{"text": "a"}\n{broken\n[1]\n"s"\n{"text": "z"}',
            ["a", "invalid_json", "not_an_object", "not_an_object", "z"],
        ),
        ("a.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', ["a", "invalid_utf8"]),
        ("a.jsonl", '{"text": "a"}\n' + "[" * 50_000 + "\n", ["a", "invalid_json"]),
        ("u.jsonl", '{"text": "é"}\n{"text": "ü"}\n'.encode("utf-16"), ["é", "ü"]),
        ("a.json", '[{"text": "a"}, 1, {"text": "b"}]', ["a", "not_an_object", "b"]),
        ("a.csv", "text,lang\nhello,en\n", ["hello"]),
        ("a.csv", "id;Text;lang\n1;salut;fr\n", ["salut"]),
        ("a.csv", "lang\ttext\nen\tone\n\nde\ttwo\n", ["one", "two"]),
        ("a.csv", 'text,n\n"multi\nline",1\nnext,2\n', ["multi\nline", "next"]),
        ("a.csv", "text,n\na,1\nb,2,extra\nc\n", ["a", "invalid_fields", "c"]),
        ("a.csv", b"text,n\na,1\n\xe9t\xe9,2\nc,3\n", ["a", "invalid_utf8", "c"]),
    ],
)
def test_record_formats_fail_lines_not_files(name: str, data: str | bytes, expected: list[str]) -> None:
    assert summary(entries(name, data)) == expected


def test_line_errors_carry_line_numbers_and_raw_bytes() -> None:
    found = entries("x.jsonl", (NASTY / "one-bad-line.jsonl").read_bytes())
    errors = [e for e in found if isinstance(e, LineError)]
    assert [(e.line, e.code) for e in errors] == [(2, "invalid_json"), (5, "not_an_object")]
    assert errors[0].raw is not None and errors[0].raw.startswith(b'{"id": "l2"')
    csv_errors = [e for e in entries("m.csv", (NASTY / "messy.csv").read_bytes()) if isinstance(e, LineError)]
    assert [(e.line, e.code) for e in csv_errors] == [(3, "invalid_fields"), (4, "invalid_utf8")]


def test_csv_columns_become_fields() -> None:
    [item] = entries("a.csv", "Subject,TEXT,,from\nHi,the body,ignored,me@x.org\n")
    assert item == {"text": "the body", "fields": {"Subject": "Hi", "from": "me@x.org"}}


def test_large_jsonl_is_streamed() -> None:
    lines = b"".join(json.dumps({"text": f"line {i}"}).encode() + b"\n" for i in range(100_000))
    stream = io.BytesIO(lines)
    found = iter_file("big.jsonl", stream)
    assert next(found) == {"text": "line 0"}
    assert stream.tell() < 64 * 1024, "the whole file was read before the first item"
    assert sum(1 for _ in found) == 99_999


def test_large_json_list_is_streamed() -> None:
    items = [
        {"id": f"r{i}", "text": f"element {i}", "metadata": {"n": i, "f": i / 7}} for i in range(100_000)
    ]
    data = json.dumps(items, indent=1).encode()
    stream = io.BytesIO(data)
    found = iter_file("big.json", stream)
    assert next(found) == items[0]
    assert stream.tell() < 256 * 1024, "the whole document was read before the first item"
    assert list(found) == items[1:]


@pytest.mark.parametrize("chunk", [1, 2, 5, 64 * 1024])
def test_json_list_elements_cut_by_the_read_buffer_are_read_whole(
    chunk: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a number cut at the buffer's end must not be read as a shorter number
    monkeypatch.setattr("service.core.json_stream._JSON_CHUNK", chunk)
    data = '\ufeff [ {"text": "a", "n": 123456789}, 7, {"text": "b\\n\\"]", "x": [1, {"y": -2.5e3}]} ,"s" ]\n'
    found = entries("x.json", data.encode())
    assert found[0] == {"text": "a", "n": 123456789}
    assert found[2] == {"text": 'b\n"]', "x": [1, {"y": -2500.0}]}
    assert [(e.line, e.code) for e in found if isinstance(e, LineError)] == [
        (2, "not_an_object"),
        (4, "not_an_object"),
    ]
    assert summary(entries("u.json", '[{"text": "é"}]'.encode("utf-16"))) == ["é"]


def test_a_jsonl_line_python_cannot_read_fails_alone() -> None:
    data = '{"text": "a"}\n{"text": "b", "metadata": {"n": ' + "9" * 5000 + '}}\n{"text": "c"}\n'
    assert summary(entries("x.jsonl", data)) == ["a", "invalid_json", "c"]


@pytest.mark.parametrize(
    ("name", "ignored"),
    [
        ("notes.md", False),
        ("Compte rendu été.md", False),
        ("report.csv", False),
        (".hidden.txt", True),
        (".done", True),
        ("notes.md~", True),
        (".notes.md.swp", True),
        ("notes.swp", True),
        ("#notes.md#", True),
        ("~$report.docx", True),
        ("video.mp4.part", True),
        ("export.jsonl.crdownload", True),
        ("big.zip.download", True),
        ("upload.tmp", True),
        ("Thumbs.db", True),
        ("4913", True),
    ],
)
def test_temporary_and_hidden_names_are_ignored(name: str, ignored: bool) -> None:
    assert ignored_name(name) is ignored
