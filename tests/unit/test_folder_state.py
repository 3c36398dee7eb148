"""Pure parts of the folder source's state and result matching (issue 10): records that
cannot be written again, DLQ entries within a size, shortened names, which intake
message a result event answers, the bounded retries and where results files go."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest

from service.core.events import fitted_entry
from service.settings import Settings
from service.sources.folders.claim import results_place
from service.sources.folders.read import ReadConfig, _record, entry_json
from service.sources.folders.results import answered_seq, belongs
from service.sources.folders.retry import done_event_delay_s, step_delay_s
from service.state.folder_files import FileMeta
from service.state.safe_paths import NAME_MAX, fit_name


def read_config(max_item_bytes: int = 1 << 20) -> ReadConfig:
    spec = Settings().registry["summarize"]
    return ReadConfig(spec, "normal", max_item_bytes, "max_completion_tokens", "enrich.in.summarize")


META = FileMeta("k", "x.jsonl", "summarize", "/nowhere/x.jsonl", "2026-01-01T00:00:00.000Z")


def test_a_record_too_deep_to_write_again_fails_alone() -> None:
    deep: Any = []
    for _ in range(5000):  # read fine by some reader, too deep for json.dumps
        deep = [deep]
    key, payload, bad = _record(7, {"id": "d1", "text": "t", "metadata": {"x": deep}}, read_config(), META)
    assert (key, payload) == ("!7", b"") and bad is not None
    event, dlq, error = bad
    assert error.code == "invalid_json" and json.loads(event)["id"] == "d1"
    assert json.loads(dlq)["raw"] == '{"id":"d1","text":"t"}'


def test_a_huge_bad_record_is_dead_lettered_as_a_prefix() -> None:
    entry = {"id": "big", "text": "x" * 3_000_000}
    _, _, bad = _record(1, entry, read_config(1 << 20), META)
    assert bad is not None
    dlq = json.loads(bad[1])
    assert len(bad[1]) <= 1 << 20 and dlq["truncated"]["field"] == "raw" and dlq["item"] is None
    assert dlq["raw"].startswith('{"id": "big"') and dlq["error"]["code"] == "item_too_large"


def test_dlq_entries_keep_small_entries_and_cut_large_ones() -> None:
    small = {"id": "a", "raw": "r" * 10, "error": {"code": "invalid_json", "message": "m"}}
    assert json.loads(fitted_entry(small, entry_json, 1000)) == small
    huge = {"id": "a", "item": {"text": "\x00" * 100_000}, "error": {"code": "c", "message": "m" * 9000}}
    out = fitted_entry(huge, entry_json, 4096)
    assert len(out) <= 4096 and json.loads(out)["truncated"]["field"] == "entry"


@pytest.mark.parametrize(
    ("name", "suffix"),
    [
        ("n" * 236 + ".txt", ".results.jsonl"),
        ("é" * 127, ""),
        ("x" * 255, ".results.jsonl"),
        ("a.b" * 80, ""),
    ],
)
def test_fit_name_is_deterministic_and_never_too_long(name: str, suffix: str) -> None:
    fitted = fit_name(name, suffix, reserve=11)
    assert fitted == fit_name(name, suffix, reserve=11) and fitted.endswith(suffix)
    assert len(os.fsencode(fitted)) + 11 <= NAME_MAX
    assert fit_name("short.md", ".results.jsonl") == "short.md.results.jsonl"
    assert fit_name("n" * 250 + ".txt", "") != fit_name("n" * 251 + ".txt", ""), "the hash tells them apart"


@pytest.mark.parametrize(
    ("headers", "seq"),
    [
        ({"Nats-Msg-Id": "a:tags", "Enrichd-Intake-Seq": "12"}, 12),
        ({"Nats-Msg-Id": "a:b:tags:cached:40"}, 40),
        ({"Nats-Msg-Id": "a:tags:error:7"}, 7),
        ({"Nats-Msg-Id": "a:tags:dup:9", "Enrichd-Intake-Seq": "9"}, 9),
        ({"Nats-Msg-Id": "a:tags"}, None),
        (None, None),
    ],
)
def test_answered_seq(headers: dict[str, str] | None, seq: int | None) -> None:
    assert answered_seq(headers) == seq


def test_belongs_matches_the_intake_message_not_just_the_id() -> None:
    assert belongs({"x": 5}, "x", 5) is True
    assert belongs({"x": 5}, "x", 6) is False  # another file's message of the same item
    assert belongs({}, "x", 6) is None  # published, PubAck not recorded yet: look again later
    assert belongs(None, "x", 6) is True and belongs({"x": 5}, "x", None) is True  # by id alone


@pytest.mark.parametrize(
    ("failures", "temporary", "delay_s"),
    [
        (1, False, 2.0),
        (2, False, 4.0),
        (3, False, 8.0),
        (4, False, None),  # OTHER_ATTEMPTS: the file is given up
        (1, True, 2.0),
        (8, True, 256.0),
        (9, True, 300.0),  # capped at RETRY_MAX_S
        (11, True, 300.0),
        (12, True, None),  # TEMPORARY_ATTEMPTS
    ],
)
def test_a_failed_step_is_retried_with_a_doubling_backoff_a_bounded_number_of_times(
    failures: int, temporary: bool, delay_s: float | None
) -> None:
    assert step_delay_s(failures, temporary=temporary) == delay_s


@pytest.mark.parametrize(
    ("failures", "delay_s"),
    [(1, 4.0), (2, 8.0), (5, 64.0), (6, None)],  # DONE_EVENT_ATTEMPTS
)
def test_file_done_is_retried_a_bounded_number_of_times(failures: int, delay_s: float | None) -> None:
    assert done_event_delay_s(failures) == delay_s


@pytest.mark.parametrize(
    ("rel", "parts", "name"),
    [
        ("tags/export.jsonl", ("tags",), "export.jsonl.results.jsonl"),
        ("tags/a/b/x.csv", ("tags", "a", "b"), "x.csv.results.jsonl"),
        ("q3.md", ("summarize",), "q3.md.results.jsonl"),  # the default handler's folder
    ],
)
def test_the_results_file_goes_under_the_handler_keeping_the_folders_below(
    rel: str, parts: tuple[str, ...], name: str
) -> None:
    handler = rel.split("/")[0] if "/" in rel else "summarize"
    meta = FileMeta("k", rel, handler, "/nowhere/x", "2026-01-01T00:00:00.000Z")
    assert results_place(Path("/out"), meta) == (Path("/out"), parts, name)
