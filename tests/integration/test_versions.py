"""Handler versions (CONTRACT §13, issue 12 must-show 1): a changed prompt answers the same
ids afresh, with the new ``handler_version``, on the sync and the batch route; asked
again under the new version they are ``cached: true``; a re-submission under an unchanged
version stays cached. The fresh answer of an id already answered under the old version
reaches the consumer of ``enrich.out.<handler>`` even inside JetStream's duplicate
window (the sink resends it as ``<id>:<handler>:dup:<intake seq>``)."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import events, publish_items, read_stream

BATCHING = {"max_wait_s": 0.3, "poll_interval_s": 0.2}
URGENT = [
    {"id": f"ver-u{i}", "text": f"urgent note {i} about invoices", "priority": "urgent"} for i in range(3)
]
NORMAL = [{"id": f"ver-n{i}", "text": f"normal note {i} about travel"} for i in range(3)]
IDS = sorted(item["id"] for item in URGENT + NORMAL)


async def out_messages(js: Any, daemon: Any, prefix: str, count: int) -> list[Any]:
    msgs = await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", count, timeout_s=40)
    assert len(msgs) == count, [json.loads(m.data)["id"] for m in msgs]
    return msgs


def by_route(evs: list[dict[str, Any]]) -> dict[str, str]:
    return {e["id"]: e["route"] for e in evs}


async def test_a_changed_prompt_answers_afresh_then_cached_under_the_new_version(
    make_daemon, nc, prefix, emulator
) -> None:
    js = nc.jetstream()
    first = await make_daemon(batching=BATCHING)
    v1 = first.settings.registry["tags"].version
    await publish_items(js, f"{prefix}.in.tags", [*URGENT, *NORMAL])
    round1 = events(await out_messages(js, first, prefix, 6))
    assert sorted(e["id"] for e in round1) == IDS
    assert all(e["status"] == "ok" and not e["cached"] and e["handler_version"] == v1 for e in round1)
    assert by_route(round1) == {**{i["id"]: "sync" for i in URGENT}, **{i["id"]: "batch" for i in NORMAL}}

    # the same version again: answered from the store, no provider call
    calls = emulator.stats
    await publish_items(js, f"{prefix}.in.tags", [*URGENT, *NORMAL])
    round2 = events(await out_messages(js, first, prefix, 12))[6:]
    assert sorted(e["id"] for e in round2) == IDS
    assert all(e["cached"] and e["handler_version"] == v1 and e["cost_usd"] == 0 for e in round2)
    after = emulator.stats
    assert after["chat_requests_ok"] == calls["chat_requests_ok"]
    assert after["batch_lines_total"] == calls["batch_lines_total"]
    await first.stop()

    # a changed prompt: a new version, the same ids answered afresh (provider calls seen)
    second = await make_daemon(
        batching=BATCHING, handlers={"tags": {"prompt": "Give the topics of this note as tags:\n\n{text}"}}
    )
    v2 = second.settings.registry["tags"].version
    assert v2 != v1 and len(v2) == 12
    before = emulator.stats
    await publish_items(js, f"{prefix}.in.tags", [*URGENT, *NORMAL])
    msgs = (await out_messages(js, second, prefix, 18))[12:]
    round3 = events(msgs)
    assert sorted(e["id"] for e in round3) == IDS
    assert all(e["status"] == "ok" and not e["cached"] and e["handler_version"] == v2 for e in round3)
    assert by_route(round3) == by_route(round1)
    after = emulator.stats
    assert after["chat_requests_ok"] - before["chat_requests_ok"] >= len(URGENT)
    assert after["batch_lines_total"] - before["batch_lines_total"] == len(NORMAL)
    # within JetStream's duplicate window, `<id>:tags` was taken by the first answer: the
    # consumer still got the fresh one, under a `:dup:<intake seq>` id
    for msg in msgs:
        event = json.loads(msg.data)
        seq = msg.headers["Enrichd-Intake-Seq"]
        assert msg.headers["Nats-Msg-Id"] == f"{event['id']}:tags:dup:{seq}", msg.headers

    # the new version again: cached, with that version
    calls = emulator.stats
    await publish_items(js, f"{prefix}.in.tags", [*URGENT, *NORMAL])
    round4 = events(await out_messages(js, second, prefix, 24))[18:]
    assert sorted(e["id"] for e in round4) == IDS
    assert all(e["cached"] and e["handler_version"] == v2 for e in round4)
    assert emulator.stats["chat_requests_ok"] == calls["chat_requests_ok"]
    assert emulator.stats["batch_lines_total"] == calls["batch_lines_total"]
    # exactly one event per intake message: nothing else arrived
    extra = await read_stream(js, second.subjects.stream("OUT"), f"{prefix}.out.tags", 25, timeout_s=1.5)
    assert len(extra) == 24
