"""Watched folders under faults (issue 10): files that never finished, temporary OS errors,
a planted symlink in the outbox, file modes, and two files with the same content. Real
temp dirs, watchfiles, nats-server and the emulator over HTTP, the daemon in-process."""

from __future__ import annotations

import errno
import json
import os
import stat
from pathlib import Path
from typing import Any

import pytest

from service.sources.folders import retry
from tests.conftest import read_stream
from tests.integration.test_folders import drop, folder_daemon, lines, outcome, wait_for

__all__ = ["folder_daemon"]  # the fixture, imported for this module


@pytest.fixture(autouse=True)
def quick_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    # the backoff of a failed step starts at 2 s; the tests need not wait that long
    monkeypatch.setattr(retry, "RETRY_BASE_S", 0.2)


def mode(path: Path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


async def test_a_name_of_240_bytes_gets_its_results_and_a_longer_one_a_shortened_name(
    folder_daemon: Any, tmp_path: Path
) -> None:
    await folder_daemon()
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox" / "summarize"
    legal = "n" * 236 + ".txt"  # 240 bytes: its results name is 254, its temporary names were longer
    longest = "é" * 124 + "lg.md"  # 253 bytes: even the results name must be shortened
    assert len(os.fsencode(legal)) == 240 and len(os.fsencode(longest)) == 253
    (tmp_path / "a.txt").write_text("a note whose name is long")
    (tmp_path / "b.md").write_text("another note whose name is longer still")
    drop(tmp_path / "a.txt", inbox / legal, rename=False)
    drop(tmp_path / "b.md", inbox / longest, rename=False)
    first = outbox / f"{legal}.results.jsonl"
    await wait_for(
        lambda: first.exists() and any(outbox.glob("é*.md.results.jsonl")), "both results files", 30
    )
    [second] = outbox.glob("é*.md.results.jsonl")  # shortened: the same prefix, a hash, the suffix
    assert second.name.startswith("é" * 100) and len(os.fsencode(second.name)) <= 255, second.name
    assert [outcome(e) for e in lines(first)] == ["ok"]
    assert [outcome(e) for e in lines(second)] == ["ok"]
    assert (inbox / ".done" / legal).exists()
    [kept] = [p for p in (inbox / ".done").iterdir() if p.name != legal]
    assert kept.name.startswith("é" * 100) and kept.name.endswith(".md"), kept.name
    assert not list((inbox / ".processing").iterdir())
    assert not list(outbox.glob(".*")), "a temporary file was left behind"


async def test_a_10_mb_txt_is_refused_and_a_huge_record_is_dead_lettered_within_max_payload(
    folder_daemon: Any, tmp_path: Path, nc: Any, prefix: str
) -> None:
    daemon, source = await folder_daemon()
    inbox, failed = tmp_path / "inbox", tmp_path / "inbox" / ".failed"
    (tmp_path / "big.txt").write_text("word " * 2_000_000)  # 10 MB: one item, over max_item_bytes
    drop(tmp_path / "big.txt", inbox / "big.txt")
    with (tmp_path / "rows.jsonl").open("w") as f:
        f.write(json.dumps({"id": "huge", "text": "x " * 1_500_000}) + "\n")  # 3 MB: this record only
        f.write(json.dumps({"id": "fine", "text": "a normal line"}) + "\n")
    drop(tmp_path / "rows.jsonl", inbox / "rows.jsonl")
    error_file = failed / "big.txt.error.json"
    results = tmp_path / "outbox" / "summarize" / "rows.jsonl.results.jsonl"
    await wait_for(
        lambda: error_file.exists() and results.exists(), "the big file refused, the rows done", 60
    )
    error = json.loads(error_file.read_text())
    assert error["code"] == "item_too_large" and "limit" in error["message"]
    assert (failed / "big.txt").stat().st_size == 10_000_000
    assert [outcome(e) for e in lines(results)] == ["item_too_large", "ok"]
    [dlq] = await read_stream(nc.jetstream(), daemon.subjects.stream("DLQ"), f"{prefix}.dlq.summarize", 1)
    entry = json.loads(dlq.data)
    assert len(dlq.data) <= nc.max_payload and entry["id"] == "huge" and entry["truncated"]["field"] == "raw"
    assert entry["error"]["code"] == "item_too_large" and entry["raw"].startswith('{"id": "huge"')
    await wait_for(lambda: source.progress() == [], "nothing left in flight")
    assert not list((inbox / ".processing").iterdir())


async def test_a_full_disk_while_reading_is_retried_not_refused(
    folder_daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # We cannot fill the disk: os.fsync (the one call patched, in this process) answers
    # ENOSPC for the first two fsyncs of a manifest, as a full state disk would.
    real_fsync, refused = os.fsync, []

    def fsync(fd: int) -> None:
        if len(refused) < 2 and os.readlink(f"/proc/self/fd/{fd}").endswith("manifest.tsv"):
            refused.append(fd)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    await folder_daemon()
    inbox = tmp_path / "inbox"
    (tmp_path / "n.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n')
    drop(tmp_path / "n.jsonl", inbox / "n.jsonl")
    results = tmp_path / "outbox" / "summarize" / "n.jsonl.results.jsonl"
    await wait_for(lambda: results.exists() or (inbox / ".failed").exists(), "the file's outcome", 60)
    assert not (inbox / ".failed").exists(), "a full disk refused the file"
    assert len(refused) == 2 and [outcome(e) for e in lines(results)] == ["ok", "ok"]


async def test_a_symlink_planted_as_the_outbox_folder_is_not_written_through(
    folder_daemon: Any, tmp_path: Path
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "outbox").mkdir()
    os.symlink(elsewhere, tmp_path / "outbox" / "summarize")
    await folder_daemon()
    inbox, failed = tmp_path / "inbox", tmp_path / "inbox" / ".failed"
    (tmp_path / "q.md").write_text("a note")
    drop(tmp_path / "q.md", inbox / "q.md")
    await wait_for(lambda: (failed / "q.md.error.json").exists(), "the file refused", 30)
    assert list(elsewhere.iterdir()) == [], "results were written through the link"
    error = json.loads((failed / "q.md.error.json").read_text())
    assert error["code"] == "unsafe_outbox" and "symbolic link" in error["message"]
    assert [outcome(e) for e in lines(failed / "q.md.results.jsonl")] == ["ok"], "the paid result is kept"
    assert (failed / "q.md").read_text() == "a note" and not (inbox / ".done" / "q.md").exists()


async def test_state_and_outbox_files_get_private_modes_whatever_the_umask(
    folder_daemon: Any, tmp_path: Path
) -> None:
    old = os.umask(0o022)
    try:
        _, source = await folder_daemon(batching={"max_wait_s": 3600})
        inbox = tmp_path / "inbox"
        (inbox / "tags").mkdir(parents=True)
        (tmp_path / "w.jsonl").write_text('{"text": "waits in a buffer"}\n[1]\n')
        drop(tmp_path / "w.jsonl", inbox / "tags" / "w.jsonl")
        await wait_for(lambda: [p["state"] for p in source.progress()] == ["accepted"], "the file accepted")
        state = tmp_path / "state" / "folders"
        [folder] = list(state.iterdir())
        assert mode(state) == 0o700 and mode(folder) == 0o700
        assert {p.name: mode(p) for p in folder.iterdir()} == dict.fromkeys(
            ["meta.json", "manifest.tsv", "spool.tsv", "dlq.jsonl", "intake.tsv"], 0o600
        )
        assert mode(inbox / ".processing") == 0o700

        (tmp_path / "u.jsonl").write_text('{"text": "answered at once", "priority": "urgent"}\n')
        drop(tmp_path / "u.jsonl", inbox / "tags" / "sub" / "u.jsonl")
        results = tmp_path / "outbox" / "tags" / "sub" / "u.jsonl.results.jsonl"
        await wait_for(results.exists, "the urgent file's results")
        assert mode(results) == 0o640
        assert mode(results.parent) == 0o750 and mode(results.parent.parent) == 0o750
        (tmp_path / "empty.txt").write_text("")
        drop(tmp_path / "empty.txt", inbox / "empty.txt")
        error = inbox / ".failed" / "empty.txt.error.json"
        await wait_for(error.exists, "the empty file refused")
        assert mode(error) == 0o600 and mode(inbox / ".failed") == 0o700
    finally:
        os.umask(old)


async def test_two_files_with_the_same_content_each_get_their_own_event(
    folder_daemon: Any, tmp_path: Path
) -> None:
    _, source = await folder_daemon()
    inbox, outbox = tmp_path / "inbox" / "tags", tmp_path / "outbox" / "tags"
    inbox.mkdir(parents=True)
    for name in ("first", "second"):
        item = {"text": "the very same words", "metadata": {"from": name}, "source": f"src-{name}"}
        (tmp_path / f"{name}.jsonl").write_text(json.dumps(item) + "\n")
    drop(tmp_path / "first.jsonl", inbox / "first.jsonl")
    await wait_for(lambda: [p["state"] for p in source.progress()] == ["accepted"], "the first file accepted")
    drop(tmp_path / "second.jsonl", inbox / "second.jsonl")
    first, second = outbox / "first.jsonl.results.jsonl", outbox / "second.jsonl.results.jsonl"
    await wait_for(lambda: first.exists() and second.exists(), "both results files", 60)
    [a], [b] = lines(first), lines(second)
    assert a["id"] == b["id"] and a["status"] == b["status"] == "ok"
    assert (a["metadata"], a["source"]) == ({"from": "first"}, "src-first")
    assert (b["metadata"], b["source"]) == ({"from": "second"}, "src-second")
    assert a["received_at"] < b["received_at"]
    assert (a["cached"], b["cached"]) == (False, True)
    assert a["cost_usd"] > 0 and b["cost_usd"] == 0
