"""SIGKILL at each dangerous moment of the batch path, then restart: every item gets
exactly one result event, and the provider never sees an item in two batches."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path

import pytest

from devkit.process import DaemonProcess
from tests.conftest import TEST_KEY, events, read_stream

N = 60


def daemon_env(tmp_path: Path, nats_url: str, prefix: str, base_url: str) -> dict[str, str]:
    empty = tmp_path / "empty.toml"
    empty.write_text("")
    return {
        "ENRICHD_CONFIG": str(empty),
        "ENRICHD_STATE_DIR": str(tmp_path / "state"),
        "ENRICHD_NATS__URL": nats_url,
        "ENRICHD_NATS__SUBJECT_PREFIX": prefix,
        "ENRICHD_NATS__ACK_WAIT_S": "3",
        "ENRICHD_OPENAI__BASE_URL": base_url,
        "ENRICHD_OPENAI__API_KEY": TEST_KEY,
        "ENRICHD_TELEMETRY__LOG_LEVEL": "DEBUG",
        "ENRICHD_TELEMETRY__METRICS_PORT": "0",
        "ENRICHD_BATCHING__MAX_ITEMS": "20",
        "ENRICHD_BATCHING__MAX_WAIT_S": "0.5",
        "ENRICHD_BATCHING__POLL_INTERVAL_S": "0.2",
        "ENRICHD_BATCHING__RESULTS_CHUNK": "10",
        "ENRICHD_BATCHING__FLUSH_ACK_WAIT_S": "4",
        "ENRICHD_FOLDERS__INBOX": str(tmp_path / "inbox"),
        "ENRICHD_FOLDERS__OUTBOX": str(tmp_path / "outbox"),
    }


async def wait_exit(daemon: DaemonProcess, timeout_s: float = 60) -> int:
    return await asyncio.to_thread(daemon.wait_exit, timeout_s)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("failpoint", "after"),
    [
        ("after_buffer", "30"),  # half the items buffered, the rest still in intake
        ("mid_intake_acks", "10"),  # a fetch's items all buffered, only some intake acks sent
        ("after_flush_record", "0"),  # flush written, buffer not yet acked
        ("after_upload", "0"),  # file uploaded, no batch created
        ("after_create", "0"),  # batch created, id not yet recorded
        ("while_polling", "1"),  # batch in flight
        ("mid_publish", "0"),  # some results published, not checkpointed
    ],
)
async def test_sigkill_then_restart_gives_exactly_one_result_each(
    failpoint: str, after: str, nats_url, nc, prefix, emulator, tmp_path
) -> None:
    env = daemon_env(tmp_path, nats_url, prefix, emulator.base_url)
    daemon = DaemonProcess(env, tmp_path / "daemon.log")
    daemon.start(extra_env={"ENRICHD_FAILPOINT": failpoint, "ENRICHD_FAILPOINT_AFTER": after})
    js = nc.jetstream()
    for i in range(N):
        await js.publish(
            f"{prefix}.in.tags", json.dumps({"id": f"c{i:03d}", "text": f"crash item {i}"}).encode()
        )
    code = await wait_exit(daemon)
    assert code == -9, f"failpoint {failpoint} was not reached:\n{daemon.log_tail()}"
    daemon.start()
    try:
        stream = prefix.upper() + "_OUT"
        await read_stream(js, stream, f"{prefix}.out.tags", N, timeout_s=45)
        # then look a little longer for anything beyond N (a duplicate would show here)
        out = events(await read_stream(js, stream, f"{prefix}.out.tags", N + 1, timeout_s=3))
    finally:
        assert daemon.terminate() == 0, daemon.log_tail()
    ids = Counter(e["id"] for e in out)
    assert len(ids) == N, (
        f"missing: {sorted({f'c{i:03d}' for i in range(N)} - set(ids))}\n{daemon.log_tail()}"
    )
    assert set(ids.values()) == {1}, f"duplicates: {[k for k, v in ids.items() if v > 1]}"
    assert all(e["status"] == "ok" and e["route"] == "batch" for e in out)
    sent = Counter(emulator.stats["custom_ids_submitted"])
    assert len(sent) == N and set(sent.values()) == {1}, "an item reached the provider twice"


@pytest.mark.slow
@pytest.mark.parametrize(
    ("failpoint", "after"),
    [("after_flush_record", "0"), ("after_create", "0"), ("mid_publish", "0")],
)
async def test_sigkill_with_packs_maps_every_item_back_once(
    failpoint: str, after: str, nats_url, nc, prefix, emulator, tmp_path
) -> None:
    """Packs (CONTRACT §12) through a crash: which items are in which pack is in the flush
    object, so after a restart every item still gets exactly one event from its pack."""
    env = daemon_env(tmp_path, nats_url, prefix, emulator.base_url)
    config = tmp_path / "packs.toml"
    config.write_text("[handlers.tags]\npack = 8\n")
    env["ENRICHD_CONFIG"] = str(config)
    daemon = DaemonProcess(env, tmp_path / "daemon.log")
    daemon.start(extra_env={"ENRICHD_FAILPOINT": failpoint, "ENRICHD_FAILPOINT_AFTER": after})
    js = nc.jetstream()
    for i in range(N):
        await js.publish(
            f"{prefix}.in.tags", json.dumps({"id": f"p{i:03d}", "text": f"packed crash item {i}"}).encode()
        )
    code = await wait_exit(daemon)
    assert code == -9, f"failpoint {failpoint} was not reached:\n{daemon.log_tail()}"
    daemon.start()
    try:
        stream = prefix.upper() + "_OUT"
        await read_stream(js, stream, f"{prefix}.out.tags", N, timeout_s=45)
        out = events(await read_stream(js, stream, f"{prefix}.out.tags", N + 1, timeout_s=3))
    finally:
        assert daemon.terminate() == 0, daemon.log_tail()
    ids = Counter(e["id"] for e in out)
    assert len(ids) == N and set(ids.values()) == {1}, daemon.log_tail()
    assert all(e["status"] == "ok" and e["route"] == "batch" and e["packed"] > 1 for e in out)
    sent = Counter(emulator.stats["custom_ids_submitted"])
    assert set(sent.values()) == {1}, "a pack reached the provider twice"
    assert emulator.stats["packed_items_answered"] == N  # every item answered in one pack, once


@pytest.mark.slow
async def test_sigterm_under_load_exits_cleanly_and_loses_nothing(
    nats_url, nc, prefix, emulator, tmp_path
) -> None:
    from service.emulator import FaultConfig

    emulator.set_faults(FaultConfig(latency_s=0.3))
    env = daemon_env(tmp_path, nats_url, prefix, emulator.base_url)
    env["ENRICHD_SHUTDOWN__GRACE_S"] = "5"
    daemon = DaemonProcess(env, tmp_path / "daemon.log").start()
    js = nc.jetstream()
    items = [
        {"id": f"s{i:03d}", "text": f"item {i}", "priority": "urgent" if i % 3 == 0 else "normal"}
        for i in range(150)
    ]
    for item in items:
        await js.publish(f"{prefix}.in.tags", json.dumps(item).encode())
    await asyncio.sleep(0.5)  # mid-run: sync calls in flight, batches buffered or submitted
    loop = asyncio.get_running_loop()
    started = loop.time()
    code = await asyncio.to_thread(daemon.terminate, 30)
    assert code == 0, daemon.log_tail()
    assert loop.time() - started < 5 + 10  # the grace period plus the bounded close stages
    daemon.start()
    try:
        stream = prefix.upper() + "_OUT"
        await read_stream(js, stream, f"{prefix}.out.tags", len(items), timeout_s=60)
        out = events(await read_stream(js, stream, f"{prefix}.out.tags", len(items) + 1, timeout_s=3))
    finally:
        assert daemon.terminate() == 0, daemon.log_tail()
    ids = Counter(e["id"] for e in out)
    assert len(ids) == len(items) and set(ids.values()) == {1}
    assert all(e["status"] == "ok" for e in out)
    # the shutdown line counts the batch route's results too (issue 11)
    lines = [line for line in daemon.log_tail(100000).splitlines() if '"stopped: ' in line]
    batch_ok = sum(int(line.split("batch: ok=")[1].split()[0]) for line in lines)
    sync_ok = sum(int(line.split(" ok=")[1].split()[0]) for line in lines)
    assert batch_ok > 0 and batch_ok + sync_ok >= len(items), lines


@pytest.mark.slow
async def test_three_replicas_one_killed_mid_batch(nats_url, nc, prefix, emulator, tmp_path) -> None:
    from service.emulator import FaultConfig

    emulator.set_faults(FaultConfig(batch_delay_s=3))
    replicas = []
    for n in range(3):
        home = tmp_path / f"r{n}"
        home.mkdir()
        env = daemon_env(home, nats_url, prefix, emulator.base_url)
        env["ENRICHD_BATCHING__LEASE_S"] = "2"
        replicas.append(DaemonProcess(env, home / "daemon.log").start())
    js = nc.jetstream()
    total = 200
    for i in range(total):
        await js.publish(
            f"{prefix}.in.tags", json.dumps({"id": f"r{i:03d}", "text": f"replica item {i}"}).encode()
        )
    # wait until every replica... at least the victim owns a batch in flight, then kill it
    victim = replicas[0]
    kv = await js.key_value(prefix.upper() + "_BATCHES")
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 30
    owners: set[str] = set()
    while loop.time() < deadline:
        try:
            keys = await kv.keys()
        except Exception:  # noqa: BLE001 - no records yet
            keys = []
        owners = set()
        for key in keys:
            record = json.loads((await kv.get(key)).value)
            if record["state"] == "submitted":
                owners.add(record["owner"])
        if any(o.endswith(_digest(tmp_path / "r0" / "state")) for o in owners):
            break
        await asyncio.sleep(0.1)
    victim.kill()
    try:
        await read_stream(js, prefix.upper() + "_OUT", f"{prefix}.out.tags", total, timeout_s=60)
        out = events(
            await read_stream(js, prefix.upper() + "_OUT", f"{prefix}.out.tags", total + 1, timeout_s=3)
        )
    finally:
        for r in replicas[1:]:
            assert r.terminate() == 0, r.log_tail()
    ids = Counter(e["id"] for e in out)
    assert len(ids) == total and set(ids.values()) == {1}
    sent = Counter(emulator.stats["custom_ids_submitted"])
    assert len(sent) == total and set(sent.values()) == {1}
    adopted = sum(r.log_path.read_text().count('"adopted batch"') for r in replicas[1:])
    assert adopted >= 1, "no surviving replica adopted the killed replica's batch"


def _digest(state_dir: Path) -> str:
    import hashlib

    return hashlib.sha256(str(state_dir.resolve()).encode()).hexdigest()[:8]
