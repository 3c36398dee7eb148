"""The daemon's operating modes and the operator's command line: embedded defaults,
authenticated NATS, provider quirks, `enrichd check|batches|dlq|submit`."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import nats
import pytest

from service.broker.embedded import find_binary
from tests.conftest import FIXTURES, TEST_KEY, events, read_stream, settings_for

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cli_env(tmp_path: Path, nats_url: str, prefix: str, base_url: str | None = None) -> dict[str, str]:
    empty = tmp_path / "cli.toml"
    empty.write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENRICHD_", "OPENAI_"))}
    env.update(
        {
            "ENRICHD_CONFIG": str(empty),
            "ENRICHD_NATS__URL": nats_url,
            "ENRICHD_NATS__SUBJECT_PREFIX": prefix,
            "ENRICHD_STATE_DIR": str(tmp_path / "cli-state"),
        }
    )
    if base_url:
        env.update({"ENRICHD_OPENAI__BASE_URL": base_url, "ENRICHD_OPENAI__API_KEY": TEST_KEY})
    return env


async def enrichd(*args: str, env: dict[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
    )


async def test_embedded_defaults_start_nats_and_the_emulator(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from service.app import Daemon
    from service.settings import load_settings

    empty = tmp_path / "e.toml"
    empty.write_text("")
    port = free_port()
    settings = load_settings(
        empty, state_dir=tmp_path / "state", nats={"embedded_port": port}, telemetry={"metrics_port": 0}
    )
    assert settings.nats.embedded and settings.openai.use_emulator
    daemon = Daemon(settings)
    await daemon.start()
    try:
        assert daemon.nats_url.endswith(f":{port}")
        assert any("SYNTHETIC" in r.getMessage() for r in caplog.records)
        from service.broker.connect import read_embedded_auth

        auth = read_embedded_auth(tmp_path / "state")  # the embedded server requires it
        assert auth is not None
        nc = await nats.connect(daemon.nats_url, user=auth.user, password=auth.password)
        reply = json.loads(
            (await nc.request("enrich.sync.tags", b'{"text": "embedded works"}', timeout=10)).data
        )
        await nc.close()
        assert reply["status"] == "ok"
        assert (tmp_path / "state" / "nats" / "jetstream").is_dir()
    finally:
        await daemon.stop()
    with socket.socket() as s:  # the embedded server is gone with the daemon
        assert s.connect_ex(("127.0.0.1", port)) != 0


async def test_nats_user_password(tmp_path: Path, emulator: Any, prefix: str) -> None:
    from service.app import Daemon

    port = free_port()
    proc = subprocess.Popen(  # noqa: ASYNC220 - returns at once
        [
            str(find_binary()),
            "-a",
            "127.0.0.1",
            "-p",
            str(port),
            "-js",
            "-sd",
            str(tmp_path / "js"),
            "--user",
            "enrichd",
            "--pass",
            "s3cret-pass-word",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        url = f"nats://127.0.0.1:{port}"
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            await asyncio.sleep(0.05)
        settings = settings_for(
            tmp_path, url, prefix, emulator.base_url, nats={"user": "enrichd", "password": "s3cret-pass-word"}
        )
        assert "s3cret-pass-word" in settings.secrets()
        daemon = Daemon(settings)
        await daemon.start()
        try:
            nc = await nats.connect(url, user="enrichd", password="s3cret-pass-word")
            reply = json.loads(
                (await nc.request(f"{prefix}.sync.tags", b'{"text": "auth"}', timeout=10)).data
            )
            await nc.close()
            assert reply["status"] == "ok"
        finally:
            await daemon.stop()
        bad = settings_for(
            tmp_path, url, prefix, emulator.base_url, nats={"user": "enrichd", "password": "wrong"}
        )
        with pytest.raises(Exception, match="(?i)authorization|auth"):
            await Daemon(bad).start()
    finally:
        proc.terminate()
        proc.wait(10)


async def test_empty_string_file_ids_and_slow_finalizing(make_daemon, nc, prefix, emulator) -> None:
    from service.emulator import FaultConfig

    emulator.set_faults(FaultConfig(empty_string_file_ids=True, batch_stuck_finalizing_s=1.0))
    daemon = await make_daemon(batching={"max_wait_s": 0.3, "poll_interval_s": 0.2})
    js = nc.jetstream()
    for i in range(8):
        await js.publish(f"{prefix}.in.tags", json.dumps({"id": f"q{i}", "text": f"quirk {i}"}).encode())
    out = events(await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 8, timeout_s=30))
    assert sorted(e["id"] for e in out) == [f"q{i}" for i in range(8)]
    assert all(e["status"] == "ok" for e in out)


async def test_cli_check_batches_dlq_and_submit(
    make_daemon, nc, prefix, emulator, nats_url, tmp_path
) -> None:
    from service.emulator import FaultConfig

    daemon = await make_daemon(batching={"max_wait_s": 0.3, "poll_interval_s": 0.2})
    env = cli_env(tmp_path, nats_url, prefix, emulator.base_url)
    check = await enrichd("check", env=env)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "ok   nats" in check.stdout and "ok   provider" in check.stdout
    # submit + wait through the batch path; one item fails for good
    note = tmp_path / "note.md"
    note.write_text("---\ntitle: Kyoto\ntags: [travel, japan]\n---\nTemples and gardens.\n")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"id": "dead-1", "text": "fail [[emulator:status=400]]"}) + "\n")
    done = await enrichd("submit", "tags", str(note), str(bad), "--wait", "--timeout", "40", env=env)
    results = [json.loads(line) for line in done.stdout.splitlines()]
    assert done.returncode == 3, done.stderr  # 3: every result arrived, some are errors
    assert {r["status"] for r in results} == {"ok", "error"} and all(r["route"] == "batch" for r in results)
    listing = await enrichd("batches", "list", "--json", env=env)
    records = json.loads(listing.stdout)
    # one batch, or two when the second item arrived after the first flush
    assert records and all(r["state"] == "published" for r in records)
    assert sum(r["request_counts"]["total"] for r in records) == 2
    table = await enrichd("batches", "list", env=env)
    assert records[0]["batch_id"] in table.stdout and "published" in table.stdout
    shown = json.loads((await enrichd("batches", "show", records[0]["batch_id"], env=env)).stdout)
    assert shown["flush_id"] == records[0]["flush_id"]
    listed = await enrichd("dlq", "list", "--json", env=env)
    dlq = json.loads(listed.stdout)
    assert [d["item"]["id"] for d in dlq] == ["dead-1"], listed.stderr
    # cancel a batch in flight through the owning daemon
    emulator.set_faults(FaultConfig(batch_delay_s=30))
    await js_publish(nc, f"{prefix}.in.tags", {"id": "slow-1", "text": "will be cancelled"})
    batch_id = await wait_for_batch(env, lambda r: r["state"] == "submitted")
    cancelled = await enrichd("batches", "cancel", batch_id, env=env)
    assert cancelled.returncode == 0 and "cancel" in cancelled.stdout, cancelled.stderr
    out = events(
        await read_stream(
            nc.jetstream(), daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 3, timeout_s=40
        )
    )
    assert out[-1]["id"] == "slow-1" and out[-1]["error"]["code"] == "batch_cancelled"
    # replay the dead letters: both come back through intake, the DLQ is emptied
    emulator.set_faults(FaultConfig(batch_delay_s=0.2))
    old = {d["failed_at"] for d in json.loads((await enrichd("dlq", "list", "--json", env=env)).stdout)}
    replay = await enrichd("dlq", "replay", env=env)
    assert "replayed 2" in replay.stdout, replay.stdout + replay.stderr
    # the old entries are gone; dead-1 (a permanent 400) may already be back with a new one
    after = json.loads((await enrichd("dlq", "list", "--json", env=env)).stdout)
    assert not {d["failed_at"] for d in after} & old and {d["item"]["id"] for d in after} <= {"dead-1"}


async def js_publish(nc: Any, subject: str, item: dict[str, Any]) -> None:
    await nc.jetstream().publish(subject, json.dumps(item).encode())


async def wait_for_batch(env: dict[str, str], predicate: Any, timeout_s: float = 30) -> str:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        listing = await enrichd("batches", "list", "--json", env=env)
        for record in json.loads(listing.stdout or "[]"):
            if predicate(record) and record["batch_id"]:
                return str(record["batch_id"])
        await asyncio.sleep(0.3)
    raise AssertionError("no batch reached the expected state")


async def test_bad_config_stops_start_with_one_line(tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[batching]\nmax_items = 100000\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENRICHD_")}
    result = await enrichd("run", "--config", str(config), env=env)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"enrichd: invalid setting batching.max_items (in {config} or ENRICHD_* environment): "
        "Input should be less than or equal to 50000"
    ]


async def test_submit_email_fields(tmp_path: Path, make_daemon, nats_url, prefix, emulator) -> None:
    await make_daemon()
    env = cli_env(tmp_path, nats_url, prefix)
    result = await enrichd(
        "submit",
        "summarize",
        str(FIXTURES / "emails" / "gmail.eml"),
        "--priority",
        "urgent",
        "--wait",
        "--timeout",
        "30",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    event = json.loads(result.stdout)
    assert event["status"] == "ok" and event["route"] == "sync" and event["source"] == "email"
    assert isinstance(event["result"]["summary"], str)


async def test_estimate_needs_no_provider(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENRICHD_", "OPENAI_"))}
    config = tmp_path / "e.toml"
    config.write_text('[openai]\nbase_url = "http://127.0.0.1:9/v1"\napi_key = "sk-unused-0000"\n')
    emails = sorted(str(p) for p in (FIXTURES / "emails").glob("*.eml"))
    result = await enrichd("estimate", "summarize", *emails, "--json", "--config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["items"] == len(emails) and data["input_tokens"] > 100
    assert data["batch_usd"] == pytest.approx(data["sync_usd"] / 2)
    unknown = await enrichd("estimate", "nosuch", emails[0], "--config", str(config), env=env)
    assert unknown.returncode == 2 and "no handler named 'nosuch'" in unknown.stderr


async def test_status_shows_buffers_batches_and_dlq(
    make_daemon, nc, prefix, emulator, nats_url, tmp_path
) -> None:
    from service.emulator import FaultConfig

    emulator.set_faults(FaultConfig(batch_delay_s=20))
    daemon = await make_daemon(batching={"max_items": 10, "max_wait_s": 3600, "poll_interval_s": 0.2})
    js = nc.jetstream()
    for i in range(13):  # one full batch of 10 in flight, 3 left in the buffer
        await js.publish(f"{prefix}.in.tags", json.dumps({"id": f"st{i}", "text": f"status {i}"}).encode())
    await js.publish(f"{prefix}.in.tags", b"not json")
    await read_stream(js, daemon.subjects.stream("DLQ"), f"{prefix}.dlq.>", 1)
    env = cli_env(tmp_path, nats_url, prefix)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:
        data = json.loads((await enrichd("status", "--json", env=env)).stdout)
        flying = data["batches_in_flight"]
        if flying and flying[0]["done"] > 0 and data["buffers"] and data["buffers"][0]["items"] == 3:
            break
        assert loop.time() < deadline, data
        await asyncio.sleep(0.3)
    assert data["dlq_depth"] == 1
    assert flying[0]["total"] == 10 and 0 < flying[0]["progress"] <= 1
    text = (await enrichd("status", env=env)).stdout
    assert "batches in flight" in text and flying[0]["batch_id"] in text and "buffers" in text
    # today's tallies (saved every few seconds) and the per-file progress, read from the
    # daemon's state dir on the same host
    (tmp_path / "inbox" / "tags").mkdir(parents=True, exist_ok=True)
    (tmp_path / "inbox" / "tags" / "notes.jsonl").write_text(
        "".join(json.dumps({"id": f"f{i}", "text": f"file line {i}"}) + "\n" for i in range(4))
    )
    env["ENRICHD_STATE_DIR"] = str(tmp_path / "state")
    deadline = loop.time() + 20
    while True:
        data = json.loads((await enrichd("status", "--json", env=env)).stdout)
        files = data["files"]
        if data["today"]["results"]["error"] >= 1 and files and files[0]["state"] == "accepted":
            break
        assert loop.time() < deadline, data
        await asyncio.sleep(0.3)
    assert files[0]["file"] == "tags/notes.jsonl" and files[0]["total"] == 4 and files[0]["done"] == 0
    assert data["today"]["items_per_hour"] >= 1 and data["budget"]["daily_usd"] is None
    text = (await enrichd("status", env=env)).stdout
    assert "watched-folder files" in text and "tags/notes.jsonl" in text and "cost today" in text


async def test_metrics_health_and_readiness(make_daemon, nc, prefix, emulator) -> None:
    import aiohttp

    port = free_port()
    daemon = await make_daemon(
        telemetry={"metrics_port": port}, batching={"max_wait_s": 0.3, "poll_interval_s": 0.2}
    )
    js = nc.jetstream()
    await js.publish(
        f"{prefix}.in.tags", json.dumps({"id": "m1", "text": "metric me", "priority": "urgent"}).encode()
    )
    await js.publish(f"{prefix}.in.tags", json.dumps({"id": "m2", "text": "batch me"}).encode())
    await js.publish(f"{prefix}.in.tags", b"{broken")
    await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 3)
    async with aiohttp.ClientSession() as http:
        async with http.get(f"http://127.0.0.1:{port}/healthz") as r:
            assert r.status == 200
        async with http.get(f"http://127.0.0.1:{port}/readyz") as r:
            assert r.status == 200 and (await r.json())["ready"] is True
        async with http.get(f"http://127.0.0.1:{port}/metrics") as r:
            text = await r.text()
    assert 'enrichd_items_received_total{handler="tags"' in text
    assert 'route="sync",status="ok"' in text and 'route="batch",status="ok"' in text
    assert 'enrichd_dlq_total{code="invalid_json"' in text
    assert "enrichd_tokens_total" in text and "enrichd_cost_USD_total" in text
    assert "enrichd_item_latency_seconds_bucket" in text
    assert "enrichd_batches_in_flight" in text or "enrichd_buffer_items" in text


async def test_a_background_loop_that_dies_stops_the_daemon_with_its_traceback(make_daemon, caplog) -> None:
    # One owner of tasks (issue 11): a long-lived loop that dies is logged with its
    # traceback, and the daemon stops (exit non-zero under `enrichd run`) instead of
    # running on without it.
    daemon = await make_daemon()

    async def broken() -> None:
        raise RuntimeError("the loop broke")

    daemon._spawn(broken(), "broken")
    await asyncio.wait_for(daemon._stop.wait(), 10)
    assert daemon._failed == "the broken loop died"
    assert any("background loop died: broken" in r.getMessage() and r.exc_info for r in caplog.records)
    assert not daemon.is_ready()
