"""Metrics.outcomes sums counters per attribute set before recording: the totals on
/metrics must be what one add per event would give."""

from __future__ import annotations

from typing import Any

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from service.observability import telemetry


def event(handler: str, status: str, *, cached: bool = False, tokens: int = 10) -> dict[str, Any]:
    out: dict[str, Any] = {
        "handler": handler,
        "route": "batch",
        "status": status,
        "cached": cached,
        "model": "gpt-4o-mini",
        "usage": {"input_tokens": tokens, "output_tokens": 2},
        "cost_usd": 0.001,
    }
    if status == "error":
        out["error"] = {"code": "bad_request", "message": "", "retryable": False}
    return out


def samples(registry: Any) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    text = generate_latest(registry).decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = frozenset((k, v) for k, v in s.labels.items() if not k.startswith("otel_scope"))
            out[(s.name, labels)] = s.value
    return out


def test_outcomes_in_one_call_total_what_single_calls_give() -> None:
    observed = [(event("tags", "ok", tokens=i), 1.0) for i in range(1, 101)]
    observed += [(event("tags", "error"), 2.0), (event("summarize", "ok", cached=True), None)]
    seen: list[str] = []
    totals = []
    for batched in (True, False):
        metrics, registry, provider = telemetry.build(True)
        metrics.listeners.append(lambda e: seen.append(e["status"]))
        try:
            if batched:
                metrics.outcomes(observed)
            else:
                for e, latency in observed:
                    metrics.outcome(e, latency)
            totals.append(samples(registry))
        finally:
            provider.shutdown()
    assert totals[0] == totals[1]
    assert len(seen) == 2 * len(observed)  # every event reaches the listeners
    ok = frozenset({("handler", "tags"), ("route", "batch"), ("status", "ok"), ("cached", "false")})
    assert totals[0][("enrichd_items_completed_total", ok)] == 100
    tokens = frozenset({("model", "gpt-4o-mini"), ("route", "batch"), ("direction", "input")})
    assert (
        totals[0][("enrichd_tokens_total", tokens)] == sum(range(1, 101)) + 10
    )  # the cached one is not billed
