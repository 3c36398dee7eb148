"""Pipelines through SIGKILL (issue 13 must-show 2): killed between two steps (a step
stored, the next not yet started; the next started, the message not yet acked) and
during a step's provider batch (in flight; results half published), then restarted:
every item ends in exactly one final event, and no step whose answer was stored reached
the provider again — counted at the emulator, by prompt, over sync calls and batch lines.
On the batch route nothing is paid twice at all; on the sync route the only calls paid
twice are those answered by the provider but not yet stored when the process died."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from nats.js.errors import NoKeysError

from devkit.process import DaemonProcess
from service.contract.subjects import Subjects
from tests.conftest import events, read_stream
from tests.integration.test_crash import daemon_env, wait_exit

N = 24
STEPS = ("extract", "classify", "draft_reply")
CONFIG = """
[handlers.draft_reply]
system = "You draft short, polite replies."
prompt = "Draft a reply to this {steps.classify.label} message:\\n\\n{text}"
max_output_tokens = 80

[pipelines.triage]
steps = ["extract", "classify", { handler = "draft_reply", when = "classify.label != 'spam'" }]
"""


@pytest.mark.slow
@pytest.mark.parametrize(
    ("failpoint", "after", "priority"),
    [
        ("after_step_stored", "20", "urgent"),  # between steps: stored, next not published
        ("after_next_step", "30", "urgent"),  # between steps: next published, not acked
        ("while_polling", "1", "normal"),  # during a step's batch (a later step's)
        ("mid_publish", "1", "normal"),  # a step's batch results half published
    ],
)
async def test_sigkill_between_and_during_steps_pays_each_step_once(
    failpoint: str, after: str, priority: str, nats_url, nc, prefix, emulator, tmp_path: Path
) -> None:
    env = daemon_env(tmp_path, nats_url, prefix, emulator.base_url)
    config = tmp_path / "pipelines.toml"
    config.write_text(CONFIG)
    env["ENRICHD_CONFIG"] = str(config)
    daemon = DaemonProcess(env, tmp_path / "daemon.log")
    daemon.start(extra_env={"ENRICHD_FAILPOINT": failpoint, "ENRICHD_FAILPOINT_AFTER": after})
    js = nc.jetstream()
    for i in range(N):
        item = {"id": f"t{i:03d}", "text": f"message {i}: my parcel {i * 7} is late", "priority": priority}
        await js.publish(f"{prefix}.in.triage", json.dumps(item).encode())
    code = await wait_exit(daemon)
    assert code == -9, f"failpoint {failpoint} was not reached:\n{daemon.log_tail()}"
    # At the kill: the calls the provider answered, and the step answers the store holds.
    paid_at_kill = sum(emulator.stats["prompts"].values())
    results_kv = await js.key_value(Subjects(prefix).results_bucket)
    try:
        keys = await results_kv.keys()
    except NoKeysError:
        keys = []
    stored_at_kill = sum(1 for k in keys if k.split(".", 1)[0] in STEPS)
    daemon.start()
    try:
        stream = prefix.upper() + "_OUT"
        await read_stream(js, stream, f"{prefix}.out.triage", N, timeout_s=60)
        out = events(await read_stream(js, stream, f"{prefix}.out.triage", N + 1, timeout_s=3))
    finally:
        assert daemon.terminate() == 0, daemon.log_tail()
    ids = Counter(e["id"] for e in out)
    assert len(ids) == N, (
        f"missing: {sorted({f't{i:03d}' for i in range(N)} - set(ids))}\n{daemon.log_tail()}"
    )
    assert set(ids.values()) == {1}, f"duplicates: {[k for k, v in ids.items() if v > 1]}"
    assert all(e["status"] == "ok" for e in out), [e["error"] for e in out if e["status"] != "ok"]
    route = "sync" if priority == "urgent" else "batch"
    assert all(s["route"] == route for e in out for s in e["steps"])
    stats = emulator.stats
    steps_run = sum(len(e["steps"]) for e in out)
    prompts = Counter(stats["prompts"])
    again = sum(n - 1 for n in prompts.values())
    assert sum(prompts.values()) == steps_run + again, (sum(prompts.values()), steps_run)
    assert set(prompts.values()) <= {1, 2}
    if route == "batch":  # a batch's answers are durable at the provider: nothing is paid twice
        assert again == 0, "a step reached the provider twice"
    else:
        # A stored step is never paid again: the only calls paid twice are those the
        # provider had answered when the process died, before their answer was stored
        # (a sync call in flight at a SIGKILL leaves nothing durable behind).
        assert again <= paid_at_kill - stored_at_kill, (again, paid_at_kill, stored_at_kill)
    if route == "batch":
        sent = Counter(stats["custom_ids_submitted"])
        assert set(sent.values()) == {1} and len(sent) == steps_run
    for handler in STEPS:  # nothing under the steps' names
        assert await read_stream(js, stream, f"{prefix}.out.{handler}", 1, timeout_s=0.3) == []
