"""Two intake messages of one item answered at the same time (e.g. on two replicas) both
get their ok event, although the second carries the same Nats-Msg-Id as the first."""

from __future__ import annotations

from service.contract.subjects import Subjects
from service.core.redact import Redactor
from service.sinks.events import EventSink
from service.state.streams import ensure_streams
from tests.conftest import events, read_stream


async def test_second_answer_is_kept_and_a_redelivery_is_not(nc, prefix) -> None:
    js = nc.jetstream()
    subjects = Subjects(prefix)
    await ensure_streams(js, subjects, replicas=1, result_dedup_window_s=120)
    sink = EventSink(js, subjects, Redactor([]))
    event = {"id": "same", "handler": "tags", "status": "ok", "result": {"tags": ["a"]}}
    await sink.result(event, intake_seq=1)
    await sink.result(event, intake_seq=1)  # a redelivery of the same message: deduplicated
    await sink.result(event, intake_seq=2)  # another message of the same item: kept
    msgs = await read_stream(js, subjects.stream("OUT"), f"{prefix}.out.tags", 3, timeout_s=2)
    assert len(msgs) == 2 and [e["id"] for e in events(msgs)] == ["same", "same"]
    assert msgs[1].headers["Nats-Msg-Id"] == "same:tags:dup:2"
