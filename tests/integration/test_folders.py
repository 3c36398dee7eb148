"""Watched folders (CONTRACT §7) against a running daemon: real temp dirs, real watchfiles,
a real nats-server and the emulator over HTTP; real processes for SIGKILL and memory."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest

from devkit.process import DaemonProcess
from service.core.formats import split_front_matter
from service.sources.folders.source import FolderSource
from tests.conftest import FIXTURES, events, read_stream
from tests.integration.test_crash import daemon_env

FAST = {"max_wait_s": 0.5, "poll_interval_s": 0.2}
NASTY = FIXTURES / "nasty"


@pytest.fixture
async def folder_daemon(make_daemon: Any) -> AsyncIterator[Any]:
    """A daemon with the folder source attached; fast batches, a short settle time."""
    sources: list[Any] = []

    async def make(**overrides: Any) -> tuple[Any, Any]:
        folders = {"settle_s": 0.3, **overrides.pop("folders", {})}
        batching = {**FAST, **overrides.pop("batching", {})}
        daemon = await make_daemon(batching=batching, folders=folders, **overrides)
        source = daemon.folders  # built and started by the daemon (folders.enabled)
        assert source is not None
        sources.append(source)
        return daemon, source

    yield make
    for source in sources:
        await source.stop()


async def wait_for(condition: Callable[[], bool], what: str, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


def lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def drop(source: Path, target: Path, *, rename: bool = True) -> None:
    """Put a file into the inbox: written elsewhere then renamed in, or copied in place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    if not rename:
        shutil.copyfile(source, target)
        return
    staging = target.parent.parent / f".staging-{target.name}"
    shutil.copyfile(source, staging)
    os.replace(staging, target)


def outcome(event: dict[str, Any]) -> str:
    return "ok" if event["status"] == "ok" else event["error"]["code"]


async def test_sample_emails_and_notes_come_back_as_results(folder_daemon, tmp_path, nc, prefix) -> None:
    handlers = {
        "mailgist": {"prompt": "Mail from {from} about {subject}:\n\n{text}", "output": "text"},
        "notegist": {"prompt": "Summarise the note titled {title}:\n\n{text}", "output": "text"},
    }
    daemon, _ = await folder_daemon(handlers=handlers)
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    emails = sorted((FIXTURES / "emails").glob("*.eml"))
    notes = sorted((FIXTURES / "notes").rglob("*.md"))
    expected: list[Path] = []
    for path in emails:
        drop(path, inbox / "mailgist" / path.name)
        expected.append(outbox / "mailgist" / f"{path.name}.results.jsonl")
    for path in notes:
        rel = path.relative_to(FIXTURES / "notes")
        drop(path, inbox / "notegist" / rel, rename=False)
        expected.append(outbox / "notegist" / rel.parent / f"{rel.name}.results.jsonl")
    await wait_for(lambda: all(p.exists() for p in expected), "every results file", 60)
    for path in expected:
        [event] = lines(path)
        assert event["status"] == "ok" and event["route"] == "batch", event
        assert isinstance(event["result"], str) and event["result"]
    done = sorted(p.name for p in (inbox / ".done").iterdir())
    assert done == sorted(p.name for p in emails + notes)

    # What went to the provider: emails carry subject and sender, notes their front matter.
    js = nc.jetstream()
    stream = daemon.subjects.stream("IN")
    mails = events(await read_stream(js, stream, f"{prefix}.in.mailgist", len(emails)))
    assert len(mails) == len(emails)
    assert all(m["fields"]["subject"] and "@" in m["fields"]["from"] for m in mails)
    by_title = {
        n["fields"]["title"]: n
        for n in events(await read_stream(js, stream, f"{prefix}.in.notegist", len(notes)))
    }
    for path in notes:
        front, _ = split_front_matter(path.read_text())
        assert set(front) <= set(by_title[path.stem]["fields"]), path.name
    file_done = events(
        await read_stream(js, daemon.subjects.stream("EVENTS"), f"{prefix}.events.file.done", len(expected))
    )
    assert len(file_done) == len(expected) and all(e["ok"] == 1 and e["error"] == 0 for e in file_done)


# name → ("results", outcome of each record in order) or ("failed", error code)
CORPUS: dict[str, tuple[str, Any]] = {
    "empty.txt": ("failed", "empty_file"),
    "binary.dat": ("failed", "binary_file"),
    "latin1.txt": ("failed", "invalid_encoding"),
    "whitespace.md": ("failed", "empty_file"),
    "utf16.txt": ("results", ["ok"]),
    "x-unknown-charset.eml": ("results", ["ok"]),
    "broken-boundary.eml": ("results", ["ok"]),
    "missing-boundary.eml": ("results", ["ok"]),
    "attachment-only.eml": ("failed", "no_items"),
    "one-bad-line.jsonl": ("results", ["ok", "invalid_json", "ok", "not_an_object"]),
    "unreadable-number.jsonl": ("results", ["ok", "invalid_json", "ok"]),
    "bad-items.jsonl": (
        "results",
        [
            "ok",
            "unknown_field",
            "invalid_id",
            "invalid_priority",
            "empty_text",
            "invalid_fields",
            "item_too_large",
        ],
    ),
    "no-text-column.csv": ("failed", "invalid_format"),
    "messy.csv": ("results", ["ok", "invalid_fields", "invalid_utf8", "ok", "empty_text"]),
    "bad-front-matter.md": ("failed", "invalid_format"),
    "deep.json": ("failed", "invalid_format"),
    "list-with-junk.json": ("results", ["ok", "not_an_object", "not_an_object", "ok"]),
    "not-json.json": ("failed", "invalid_format"),
    "two-messages.mbox": ("results", ["ok", "invalid_text", "ok"]),
    "Compte rendu réunion été 2026 ü.md": ("results", ["ok"]),
    "alias-bomb.md": (
        "failed",
        "item_too_large",
    ),  # bounded expansion, still over 4 KiB: the file is its item
}
TEMPORARY = [
    ".hidden.txt",
    "draft.txt~",
    ".draft.txt.swp",
    "movie.mp4.part",
    "export.jsonl.crdownload",
    "#n.md#",
]


def make_runtime_cases(tmp_path: Path, inbox: Path) -> dict[str, tuple[str, Any]]:
    """The nasty cases git cannot hold; returns their expectations (the slow one is
    written by :func:`write_slowly`)."""
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.txt").write_text("must never be read")
    (outside / "dir").mkdir()
    (outside / "dir" / "inner.txt").write_text("must never be read either")
    os.symlink(outside / "secret.txt", inbox / "link-to-secret.txt")
    os.symlink(outside / "dir", inbox / "linked-dir")
    os.mkfifo(inbox / "pipe.txt")
    (inbox / "too-big.txt").write_text("x" * 300_000)
    (inbox / "nosuch").mkdir()
    (inbox / "nosuch" / "orphan.txt").write_text("a handler folder that does not exist")
    with open(os.path.join(os.fsencode(inbox), b"caf\xe9 latin-1 name.txt"), "wb") as f:
        f.write(b"a file whose name is not UTF-8")
    for name in TEMPORARY:
        (inbox / name).write_text("temporary: never read")
    return {
        "link-to-secret.txt": ("failed", "symlink"),
        "linked-dir": ("failed", "symlink"),
        "pipe.txt": ("failed", "not_regular_file"),
        "too-big.txt": ("failed", "file_too_large"),
        "orphan.txt": ("failed", "unknown_handler"),
        os.fsdecode(b"caf\xe9 latin-1 name.txt"): ("results", ["ok"]),
        "slow.jsonl": ("results", ["ok"] * 40),
    }


async def write_slowly(path: Path, count: int, chunks: int = 6) -> None:
    """A JSONL written in chunks with pauses shorter than settle_s, cut mid-line."""
    data = b"".join(
        json.dumps({"id": f"s{i:02d}", "text": f"slow line {i}"}).encode() + b"\n" for i in range(count)
    )
    step = len(data) // chunks + 1
    with path.open("wb") as f:
        for start in range(0, len(data), step):
            f.write(data[start : start + step])
            f.flush()
            await asyncio.sleep(0.3)


async def test_nasty_files_end_in_results_or_failed_and_the_daemon_keeps_going(
    folder_daemon, tmp_path, nc, prefix
) -> None:
    daemon, _ = await folder_daemon(
        folders={"settle_s": 1.0, "max_file_bytes": 256 * 1024}, limits={"max_item_bytes": 4096}
    )
    inbox, outbox, failed = tmp_path / "inbox", tmp_path / "outbox", tmp_path / "inbox" / ".failed"
    for i, name in enumerate(CORPUS):
        drop(NASTY / name, inbox / name, rename=i % 2 == 0)
    expected = {**CORPUS, **make_runtime_cases(tmp_path, inbox)}
    await write_slowly(inbox / "slow.jsonl", 40)

    def finished(name: str, kind: str) -> Path:
        return (
            outbox / "summarize" / f"{name}.results.jsonl"
            if kind == "results"
            else failed / f"{name}.error.json"
        )

    await wait_for(
        lambda: all(finished(n, k).exists() for n, (k, _) in expected.items()), "every outcome", 60
    )
    for name, (kind, want) in expected.items():
        if kind == "results":
            assert [outcome(e) for e in lines(finished(name, kind))] == want, name
        else:
            error = json.loads(finished(name, kind).read_text())
            assert (error["code"], error["file"]) == (want, name), error
            assert error["message"] and error["at"]
    assert (failed / "link-to-secret.txt").is_symlink() and (failed / "linked-dir").is_symlink()
    assert (tmp_path / "outside" / "secret.txt").read_text() == "must never be read"
    assert sorted(p.name for p in inbox.iterdir() if not p.name.startswith(".")) == sorted(
        ["nosuch", *(n for n in TEMPORARY if not n.startswith("."))]
    ), "temporary files must stay untouched"
    assert all((inbox / name).exists() for name in TEMPORARY)

    # Still running: a good file dropped now is enriched; bad records were dead-lettered.
    drop(NASTY / "utf16.txt", inbox / "after.txt")
    await wait_for(
        lambda: (outbox / "summarize" / "after.txt.results.jsonl").exists(), "a file after the corpus"
    )
    assert daemon.is_ready()
    bad_records = sum(w.count(c) for k, w in expected.values() if k == "results" for c in set(w) - {"ok"})
    dlq = await read_stream(
        nc.jetstream(), daemon.subjects.stream("DLQ"), f"{prefix}.dlq.summarize", bad_records + 1, 3
    )
    assert len(dlq) == bad_records


async def test_restart_keeps_waiting_files_and_a_redrop_is_answered_from_the_store(
    folder_daemon, tmp_path, nc, prefix, emulator
) -> None:
    daemon, source = await folder_daemon(batching={"max_wait_s": 3600})
    inbox, outbox = tmp_path / "inbox", tmp_path / "outbox"
    (inbox / "tags").mkdir(parents=True)
    items = [{"id": f"w{i:02d}", "text": f"waiting item {i}"} for i in range(20)]
    (tmp_path / "batch.jsonl").write_text("".join(json.dumps(item) + "\n" for item in items))
    drop(tmp_path / "batch.jsonl", inbox / "tags" / "batch.jsonl")
    await wait_for(lambda: [p["state"] for p in source.progress()] == ["accepted"], "the file accepted")
    await source.stop()
    await daemon.stop()  # items wait in the batch buffer

    await folder_daemon()  # same state dir and subjects: a restart
    first = outbox / "tags" / "batch.jsonl.results.jsonl"
    await wait_for(first.exists, "the results of the file that waited")
    assert [(e["id"], e["status"], e["cached"]) for e in lines(first)] == [
        (i["id"], "ok", False) for i in items
    ]
    sent = Counter(emulator.stats["custom_ids_submitted"])
    assert len(sent) == 20 and set(sent.values()) == {1}

    drop(tmp_path / "batch.jsonl", inbox / "tags" / "again.jsonl")
    again = outbox / "tags" / "again.jsonl.results.jsonl"
    await wait_for(again.exists, "the results of the same content dropped again")
    assert all(e["status"] == "ok" and e["cached"] for e in lines(again))
    assert Counter(emulator.stats["custom_ids_submitted"]) == sent, "the re-drop reached the provider"
    done = events(
        await read_stream(nc.jetstream(), f"{prefix.upper()}_EVENTS", f"{prefix}.events.file.done", 2)
    )
    assert [(e["file"], e["ok"], e["cached"]) for e in done] == [
        ("batch.jsonl", 20, 0),
        ("again.jsonl", 20, 20),
    ]
    assert done[0]["results"] == str(first.resolve())


async def test_stop_ends_the_results_loop_even_when_nats_py_swallows_the_cancel(
    make_daemon, nats_url
) -> None:
    # nats-py's next_msg turns a cancel on a closing connection into ConnectionClosedError (and
    # 3.11's wait_for can drop one): the loop must still end, or the shutdown stage would hang.
    daemon = await make_daemon(folders={"enabled": False})
    client = await nats.connect(nats_url)
    source = FolderSource(daemon.settings, daemon.subjects, client, daemon.redact)
    await source.start()
    entered = asyncio.Event()

    async def fetch(*_args: Any, **_kwargs: Any) -> list[Any]:
        entered.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise nats.errors.ConnectionClosedError from None
        return []

    source._results._sub.fetch = fetch
    await asyncio.wait_for(entered.wait(), 5)
    try:
        await asyncio.wait_for(source.stop(), 5)
    finally:
        await client.close()


# -- real processes --------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("failpoint", "after"),
    [
        ("while_polling", "1"),  # the file's items wait in a submitted batch
        ("folder_mid_publish", "0"),  # items published, the file not yet marked accepted
        ("folder_claimed", "0"),  # moved into .processing, not read yet
    ],
)
async def test_sigkill_then_restart_writes_the_results_once(
    failpoint: str, after: str, nats_url, prefix, emulator, tmp_path
) -> None:
    env = daemon_env(tmp_path, nats_url, prefix, emulator.base_url)
    env["ENRICHD_FOLDERS__SETTLE_S"] = "0.2"
    items = [{"id": f"k{i:02d}", "text": f"crash item {i}"} for i in range(30)]
    (tmp_path / "inbox" / "tags").mkdir(parents=True)
    (tmp_path / "inbox" / "tags" / "crash.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    daemon = DaemonProcess(env, tmp_path / "daemon.log")
    daemon.start(extra_env={"ENRICHD_FAILPOINT": failpoint, "ENRICHD_FAILPOINT_AFTER": after})
    code = await asyncio.to_thread(daemon.wait_exit, 60)
    assert code == -9, f"failpoint {failpoint} was not reached:\n{daemon.log_tail()}"
    daemon.start()
    results = tmp_path / "outbox" / "tags" / "crash.jsonl.results.jsonl"

    def finished() -> bool:  # results written, and the file's state cleaned up after them
        state = tmp_path / "state" / "folders"
        return results.exists() and state.is_dir() and not any(state.iterdir())

    try:
        await wait_for(finished, f"results after the restart:\n{daemon.log_tail()}", 60)
    finally:
        assert daemon.terminate() == 0, daemon.log_tail()
    assert [(e["id"], e["status"]) for e in lines(results)] == [(i["id"], "ok") for i in items]
    sent = Counter(emulator.stats["custom_ids_submitted"])
    assert len(sent) == len(items) and set(sent.values()) == {1}, "an item reached the provider twice"
    assert (tmp_path / "inbox" / ".done" / "crash.jsonl").exists()
    assert not list((tmp_path / "inbox" / ".processing").iterdir())
    assert not list((tmp_path / "state" / "folders").iterdir())


@pytest.mark.slow
async def test_a_large_jsonl_goes_through_several_batches_and_comes_back_in_order(
    folder_daemon, tmp_path, emulator
) -> None:
    # The 100k-line memory figure is measured by bench/folder_rss.py (too slow for the suite).
    _, source = await folder_daemon(batching={"max_items": 2000})
    count, bad = 6000, {10, 2999, 5998}
    with (tmp_path / "big.jsonl").open("w") as f:
        for i in range(count):
            f.write("{not json\n" if i in bad else json.dumps({"text": f"line {i} about {i % 13}"}) + "\n")
    drop(tmp_path / "big.jsonl", tmp_path / "inbox" / "tags" / "big.jsonl")
    results = tmp_path / "outbox" / "tags" / "big.jsonl.results.jsonl"
    await wait_for(lambda: any(p["state"] == "accepted" for p in source.progress()), "the file accepted")
    [progress] = source.progress()
    assert progress["total"] == count and progress["done"] < count
    await wait_for(results.exists, "the results of the large file", 90)
    out = lines(results)
    assert [i for i, e in enumerate(out) if e["status"] == "error"] == sorted(bad)
    assert [e["result"]["tags"] for e in out[:3]] and len(out) == count
    assert emulator.stats["batches_created"] >= 3
    # the results file is written before the file's state is dropped (see FolderSource._finish)
    await wait_for(lambda: source.progress() == [], "the file's state dropped after its results")
