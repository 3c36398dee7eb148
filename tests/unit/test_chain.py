"""Pipelines, pure (service/core/chain.py): definitions refused with one message naming
the key, ``when`` conditions, and what follows a step."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from handlers import build_registry
from service.core import chain
from service.core.chain import Final, NextStep, PipelineConfigError, build_pipelines, parse_condition

NOW = datetime(2026, 12, 2, 12, 0, tzinfo=UTC)
DRAFT = {"prompt": "Reply to this {steps.classify.label} mail:\n\n{text}"}


def registry(**extra: Any) -> dict[str, Any]:
    handlers = {"draft_reply": DRAFT, **extra}
    return build_registry(
        handlers,
        chat_model="gpt-4o-mini",
        embedding_model="text-embedding-3-small",
        step_handlers={"draft_reply", *extra},
    )


TRIAGE = {"steps": ["extract", "classify", {"handler": "draft_reply", "when": "classify.label == 'billing'"}]}


@pytest.mark.parametrize(
    ("tables", "key", "words"),
    [
        (
            {"p": {"steps": ["extract", "nosuch"]}},
            "pipelines.p.steps[1]",
            "no handler or pipeline named 'nosuch'",
        ),
        (
            {"a": {"steps": ["b"]}, "b": {"steps": ["extract", "a"]}},
            "pipelines.b.steps[1]",
            "loop (a -> b -> a)",
        ),
        ({"p": {"steps": ["extract", "p"]}}, "pipelines.p.steps[1]", "loop (p -> p)"),
        (
            {"p": {"steps": [{"handler": "extract", "when": "classify.label == 'x'"}, "classify"]}},
            "pipelines.p.steps[0].when",
            "no step that runs before 'extract'",
        ),
        (
            {"p": {"steps": ["classify", {"handler": "extract", "when": "classify.colour == 'x'"}]}},
            "pipelines.p.steps[1].when",
            "has no field 'colour'",
        ),
        (
            {"p": {"steps": ["extract", {"handler": "classify", "when": "extract.x ~ 1"}]}},
            "pipelines.p.steps[1].when",
            "cannot read",
        ),
        ({"p": {"steps": ["extract", "draft_reply"]}}, "pipelines.p.steps[1]", "{steps.classify.label}"),
        ({"p": {"steps": ["extract", "extract"]}}, "pipelines.p.steps[1]", "runs twice"),
        ({"p": {"steps": []}}, "pipelines.p.steps", "non-empty list"),
        ({"p": {"steps": ["extract"], "colour": 1}}, "pipelines.p.colour", "unknown key"),
        ({"p": {"steps": [{"handler": "extract", "if": "x"}]}}, "pipelines.p.steps[0].if", "unknown key"),
        ({"summarize": {"steps": ["extract"]}}, "pipelines.summarize", "share one namespace"),
    ],
)
def test_bad_definitions_are_refused_naming_the_key(tables: dict[str, Any], key: str, words: str) -> None:
    with pytest.raises(PipelineConfigError) as caught:
        build_pipelines(tables, registry())
    assert caught.value.key == key, str(caught.value)
    assert words in str(caught.value)


def test_a_nested_pipeline_is_inlined_and_its_condition_carried() -> None:
    built = build_pipelines(
        {
            "inner": {"steps": ["classify", "draft_reply"]},
            "outer": {"steps": ["extract", {"handler": "inner", "when": "extract.people != ''"}]},
        },
        registry(),
    )
    outer = built["outer"]
    assert outer.handlers == ("extract", "classify", "draft_reply")
    assert [len(s.when) for s in outer.steps] == [0, 1, 1]
    assert outer.version != built["inner"].version and len(outer.version) == 12


def test_the_version_changes_with_a_step_or_a_condition() -> None:
    base = build_pipelines({"t": TRIAGE}, registry())["t"].version
    other_when = {
        "steps": [*TRIAGE["steps"][:2], {"handler": "draft_reply", "when": "classify.label == 'sales'"}]
    }
    assert build_pipelines({"t": other_when}, registry())["t"].version != base
    changed = registry(draft_reply={"prompt": "Answer this {steps.classify.label} mail: {text}"})
    assert build_pipelines({"t": TRIAGE}, changed)["t"].version != base
    assert build_pipelines({"t": TRIAGE}, registry())["t"].version == base


@pytest.mark.parametrize(
    ("text", "results", "holds"),
    [
        ("classify.label == 'billing'", {"classify": {"label": "billing"}}, True),
        ("classify.label == 'billing'", {"classify": {"label": "sales"}}, False),
        ("classify.label != 'billing'", {"classify": {"label": "sales"}}, True),
        ('classify.label == "billing"', {"classify": {"label": "billing"}}, True),
        ("classify.confidence == 1", {"classify": {"confidence": 1.0}}, True),
        ("classify.confidence != 0.5", {"classify": {"confidence": 0.5}}, False),
        ("classify.confidence == 1", {"classify": {"confidence": "1"}}, False),
        ("summarize == 'ok'", {"summarize": "ok"}, True),
        # a step that did not run, or a field its result lacks: == is false, != true
        ("classify.label == 'billing'", {}, False),
        ("classify.label != 'billing'", {}, True),
        ("classify.nope != 'x'", {"classify": {"label": "x"}}, True),
    ],
)
def test_conditions(text: str, results: dict[str, Any], holds: bool) -> None:
    assert parse_condition(text).holds(results) is holds


def step_event(handler: str, result: Any, **kw: Any) -> dict[str, Any]:
    return {
        "id": "m1",
        "handler": handler,
        "status": "ok",
        "result": result,
        "error": None,
        "route": "batch",
        "model": "gpt-4o-mini",
        "handler_version": "v-" + handler,
        "batch_id": "b-" + handler,
        "attempts": 1,
        "cached": False,
        "usage": {"input_tokens": 10, "output_tokens": 2},
        "cost_usd": 0.001,
        **kw,
    }


def test_after_each_step_the_next_that_runs_then_one_final_with_sums() -> None:
    spec = build_pipelines({"t": TRIAGE}, registry())["t"]
    state = chain.start(spec, {"id": "m1", "text": "hi", "metadata": {"a": 1}}, origin_seq=7, received_at=NOW)
    nxt = chain.after_step(spec, state, step_event("extract", {"summary": "s"}), now=NOW)
    assert isinstance(nxt, NextStep) and nxt.state.index == 1 and nxt.msg_id == "m1:t:step1:7"
    # the envelope goes through JSON and back
    data = nxt.state.envelope()
    again = chain.read_envelope(data, spec)
    assert again == nxt.state
    final = chain.after_step(
        spec, again, step_event("classify", {"label": "sales", "confidence": 0.9}), now=NOW
    )
    assert isinstance(final, Final)  # the draft is skipped: its when is false
    out = final.outcome
    assert out.ok and out.handler == "t" and out.handler_version == spec.version
    assert out.result == {"extract": {"summary": "s"}, "classify": {"label": "sales", "confidence": 0.9}}
    assert out.usage is not None and (out.usage.input_tokens, out.usage.output_tokens) == (20, 4)
    assert out.cost_usd == pytest.approx(0.002) and out.attempts == 2 and out.batch_id == "b-classify"
    assert out.metadata == {"a": 1} and out.received_at == NOW
    assert final.extra["skipped"] == ["draft_reply"]
    assert [s["handler"] for s in final.extra["steps"]] == ["extract", "classify"]


def test_a_failed_step_ends_the_pipeline_naming_it() -> None:
    spec = build_pipelines({"t": TRIAGE}, registry())["t"]
    state = chain.start(spec, {"id": "m1", "text": "hi"}, origin_seq=7, received_at=NOW)
    failed = step_event(
        "extract",
        None,
        status="error",
        error={"code": "invalid_output", "message": "bad", "retryable": False},
    )
    final = chain.after_step(spec, state, failed, now=NOW)
    assert isinstance(final, Final) and final.outcome.error is not None
    assert final.outcome.error.to_dict() == {
        "code": "invalid_output",
        "message": "step 'extract': bad",
        "retryable": False,
        "step": "extract",
    }
    assert final.extra["steps"][-1]["status"] == "error" and final.outcome.result is None


def test_a_step_message_of_another_shape_is_a_bad_item() -> None:
    spec = build_pipelines({"t": TRIAGE}, registry())["t"]
    from service.core.errors import BadItemError

    for data in (
        {chain.ENVELOPE: 1, "item": {}},
        {chain.ENVELOPE: {"pipeline": "t", "index": 9, "received_at": "x"}, "item": {"id": "a"}},
    ):
        with pytest.raises(BadItemError):
            chain.read_envelope(data, spec)
    assert chain.read_envelope({"text": "a plain item"}, spec) is None


def test_the_worked_example_config_loads() -> None:
    from pathlib import Path

    from service.settings import load_settings

    example = Path(__file__).parents[2] / "config" / "examples" / "triage.toml"
    settings = load_settings(example)
    triage = settings.pipeline_specs["triage"]
    assert triage.handlers == ("extract", "classify_mail", "draft_reply")
    assert triage.steps[2].when[0].holds({"classify_mail": {"label": "complaint"}})
    [review] = settings.digest_specs.specs
    assert (review.name, review.source, review.handler) == ("weekly_review", "triage", "review")


def test_a_next_step_too_large_for_nats_ends_the_item_naming_that_step() -> None:
    spec = build_pipelines({"t": TRIAGE}, registry())["t"]
    state = chain.start(spec, {"id": "m1", "text": "hi"}, origin_seq=7, received_at=NOW)
    nxt = chain.after_step(spec, state, step_event("extract", {"people": ["x" * 50]}), now=NOW)
    assert isinstance(nxt, NextStep)
    final = chain.too_large(spec, nxt.state, 2_000_000, 1_000_000, now=NOW)
    error = final.outcome.error
    assert error is not None and (error.code, error.step) == ("item_too_large", "classify")
    assert [s["handler"] for s in final.extra["steps"]] == ["extract", "classify"]
    assert (
        final.outcome.usage is not None and final.outcome.usage.input_tokens == 10
    )  # extract's, still counted
