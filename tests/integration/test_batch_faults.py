"""Issue 10 on the batch path: permanent provider answers are bounded (alert, back-off,
then resubmit or end the items), and copies of one item are answered as soon as the
first copy's answer is stored. Real nats-server, the emulator over HTTP, the Daemon."""

from __future__ import annotations

import asyncio
import json
import logging
from collections import Counter
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest

from tests.conftest import events, read_stream

FAST = {"max_wait_s": 0.3, "poll_interval_s": 0.2}


async def publish_many(js: Any, subject: str, items: list[dict[str, Any]]) -> None:
    futures = [await js.publish_async(subject, json.dumps(item).encode()) for item in items]
    await asyncio.gather(*futures)


def one_per_id(msgs: list[Any]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for e in events(msgs):
        assert e["id"] not in out, f"two result events for {e['id']}"
        out[e["id"]] = e
    return out


async def results(js: Any, daemon: Any, prefix: str, count: int, timeout_s: float = 30.0) -> list[Any]:
    return await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", count, timeout_s)


async def lifecycle(js: Any, daemon: Any, prefix: str, topic: str, count: int) -> list[dict[str, Any]]:
    return events(await read_stream(js, daemon.subjects.stream("EVENTS"), f"{prefix}.events.{topic}", count))


async def test_an_upload_answered_401_ends_every_item_with_auth_failed(
    make_daemon, nc, prefix, emulator
) -> None:
    from service.emulator import FaultConfig

    emulator.set_faults(FaultConfig(file_upload_status=401))
    daemon = await make_daemon(batching={**FAST, "give_up_after_s": 2.0})
    js = nc.jetstream()
    await publish_many(js, f"{prefix}.in.tags", [{"id": f"a{i}", "text": f"auth {i}"} for i in range(5)])
    out = one_per_id(await results(js, daemon, prefix, 5))
    assert len(out) == 5
    for event in out.values():
        assert event["status"] == "error" and event["route"] == "batch"
        assert event["error"]["code"] == "auth_failed" and event["error"]["retryable"] is False
    dlq = events(await read_stream(js, daemon.subjects.stream("DLQ"), f"{prefix}.dlq.tags", 5))
    assert sorted(d["item"]["id"] for d in dlq) == [f"a{i}" for i in range(5)]
    [alert] = await lifecycle(js, daemon, prefix, "alert", 1)
    assert alert["kind"] == "batch_provider_error" and alert["error_code"] == "auth_failed"
    assert alert["step"] == "submit"
    [failed] = await lifecycle(js, daemon, prefix, "batch.failed", 1)
    assert failed["reason"] == "auth_failed" and failed["error"] == 5
    # backed off: not one upload of the whole file per poll round (10 in 2 s here)
    assert emulator.stats["faults_injected"]["file_upload_status"] <= 7
    await asyncio.sleep(1.0)
    assert len(await results(js, daemon, prefix, 6, timeout_s=1.5)) == 5, "one event per item"
    assert emulator.stats["batches_created"] == 0


async def test_a_batch_the_provider_forgot_is_resubmitted_as_a_new_batch(
    make_daemon, nc, prefix, emulator
) -> None:
    from service.emulator import FaultConfig

    emulator.set_faults(FaultConfig(batch_faults_next=["forget"]))
    daemon = await make_daemon(batching={**FAST, "give_up_after_s": 1.5})
    js = nc.jetstream()
    await publish_many(js, f"{prefix}.in.tags", [{"id": f"f{i}", "text": f"forgot {i}"} for i in range(10)])
    out = one_per_id(await results(js, daemon, prefix, 10))
    assert len(out) == 10 and all(e["status"] == "ok" for e in out.values())
    assert emulator.stats["faults_injected"]["batch_forget"] == 1
    assert emulator.stats["batches_created"] == 2
    forgotten, second = emulator.stats["batch_ids"]
    assert {e["batch_id"] for e in out.values()} == {second}
    [alert] = await lifecycle(js, daemon, prefix, "alert", 1)
    assert (alert["step"], alert["error_code"], alert["batch_id"]) == ("follow", "not_found", forgotten)
    [failed] = await lifecycle(js, daemon, prefix, "batch.failed", 1)
    assert failed["reason"] == "batch_lost" and failed["batch_id"] == forgotten
    assert len(await results(js, daemon, prefix, 11, timeout_s=1.5)) == 10, "one event per item"


async def test_an_output_file_that_answers_404_is_resubmitted(make_daemon, nc, prefix, emulator) -> None:
    from service.emulator import FaultConfig

    emulator.set_faults(FaultConfig(batch_faults_next=["output_404"]))
    daemon = await make_daemon(batching={**FAST, "give_up_after_s": 1.5})
    js = nc.jetstream()
    await publish_many(js, f"{prefix}.in.tags", [{"id": f"o{i}", "text": f"output {i}"} for i in range(10)])
    out = one_per_id(await results(js, daemon, prefix, 10))
    assert len(out) == 10 and all(e["status"] == "ok" for e in out.values())
    assert emulator.stats["faults_injected"]["batch_output_404"] == 1
    assert emulator.stats["batches_created"] == 2
    assert set(Counter(emulator.stats["custom_ids_submitted"]).values()) == {2}
    [failed] = await lifecycle(js, daemon, prefix, "batch.failed", 1)
    assert failed["reason"] == "output_lost"
    [alert] = await lifecycle(js, daemon, prefix, "alert", 1)
    assert (alert["step"], alert["error_code"]) == ("download", "not_found")


async def test_output_lost_in_every_batch_ends_the_items_with_batch_lost(
    make_daemon, nc, prefix, emulator
) -> None:
    from service.emulator import FaultConfig

    emulator.set_faults(FaultConfig(batch_faults_next=["output_404"] * 5))
    daemon = await make_daemon(batching={**FAST, "give_up_after_s": 1.0}, retry={"max_attempts": 2})
    js = nc.jetstream()
    await publish_many(js, f"{prefix}.in.tags", [{"id": f"l{i}", "text": f"lost {i}"} for i in range(4)])
    out = one_per_id(await results(js, daemon, prefix, 4))
    assert len(out) == 4
    assert all(e["status"] == "error" and e["error"]["code"] == "batch_lost" for e in out.values())
    assert all(e["error"]["retryable"] for e in out.values())
    dlq = events(await read_stream(js, daemon.subjects.stream("DLQ"), f"{prefix}.dlq.tags", 4))
    assert len(dlq) == 4
    assert emulator.stats["batches_created"] == 2  # one resubmit (retry.max_attempts = 2), then the end
    assert len(await results(js, daemon, prefix, 5, timeout_s=1.5)) == 4, "one event per item"


class _Lines(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@pytest.fixture
def batch_log() -> Iterator[_Lines]:
    handler = _Lines()
    logger = logging.getLogger("enrichd.batch")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


async def test_twenty_copies_of_one_item_are_paid_once_and_answered_at_once(
    make_daemon, nc, prefix, emulator, batch_log
) -> None:
    from service.emulator import FaultConfig

    emulator.set_faults(FaultConfig(batch_delay_s=1.0))
    daemon = await make_daemon(batching={"max_wait_s": 0.3, "poll_interval_s": 1.0})
    js = nc.jetstream()
    copies = [{"id": "same", "text": "one note sent twenty times", "metadata": {"n": i}} for i in range(20)]
    await publish_many(js, f"{prefix}.in.tags", copies)
    got = events(await results(js, daemon, prefix, 20, timeout_s=40))
    assert len(got) == 20
    assert sorted(e["metadata"]["n"] for e in got) == list(range(20)), "each copy keeps its own metadata"
    assert sum(not e["cached"] for e in got) == 1 and sum(e["cached"] for e in got) == 19
    assert all(e["status"] == "ok" for e in got)
    assert emulator.stats["batches_created"] == 1 and emulator.stats["batch_lines_total"] == 1
    [completed] = await lifecycle(js, daemon, prefix, "batch.completed", 1)
    done_at = datetime.fromisoformat(completed["at"].replace("Z", "+00:00"))
    late = [
        (datetime.fromisoformat(e["completed_at"].replace("Z", "+00:00")) - done_at).total_seconds()
        for e in got
    ]
    assert max(late) < 3.0, f"copies answered {max(late):.1f}s after the batch completed"
    flushes = sum(1 for m in batch_log.messages if m == "flushing buffer")
    assert flushes <= 3, f"{flushes} 'flushing buffer' lines for one batch"
    assert len(await results(js, daemon, prefix, 21, timeout_s=1.5)) == 20, "one event per copy"


@pytest.mark.slow
async def test_sigkill_while_ending_items_then_restart_gives_one_error_each(
    nats_url, nc, prefix, emulator, tmp_path
) -> None:
    from devkit.process import DaemonProcess
    from service.emulator import FaultConfig
    from tests.integration.test_crash import daemon_env, wait_exit

    emulator.set_faults(FaultConfig(file_upload_status=401))
    env = {
        **daemon_env(tmp_path, nats_url, prefix, emulator.base_url),
        "ENRICHD_BATCHING__GIVE_UP_AFTER_S": "1",
    }
    daemon = DaemonProcess(env, tmp_path / "daemon.log")
    daemon.start(extra_env={"ENRICHD_FAILPOINT": "mid_publish", "ENRICHD_FAILPOINT_AFTER": "0"})
    js = nc.jetstream()
    n = 20  # one flush (max_items 20), published in chunks of 10
    await publish_many(
        js, f"{prefix}.in.tags", [{"id": f"k{i:02d}", "text": f"killed {i}"} for i in range(n)]
    )
    assert await wait_exit(daemon) == -9, f"mid_publish was not reached:\n{daemon.log_tail()}"
    daemon.start()
    try:
        stream = prefix.upper() + "_OUT"
        await read_stream(js, stream, f"{prefix}.out.tags", n, timeout_s=45)
        out = events(await read_stream(js, stream, f"{prefix}.out.tags", n + 1, timeout_s=3))
        dlq = events(await read_stream(js, prefix.upper() + "_DLQ", f"{prefix}.dlq.tags", n + 1, timeout_s=3))
    finally:
        assert daemon.terminate() == 0, daemon.log_tail()
    ids = Counter(e["id"] for e in out)
    assert len(ids) == n and set(ids.values()) == {1}, f"{ids}\n{daemon.log_tail()}"
    assert all(e["status"] == "error" and e["error"]["code"] == "auth_failed" for e in out)
    assert sorted(d["item"]["id"] for d in dlq) == sorted(ids)
