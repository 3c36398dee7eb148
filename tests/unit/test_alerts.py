"""Alert rules (pure): failure rate, retry budget, batch SLA, cooldown."""

from __future__ import annotations

from service.core.alerts import AlertRules, AlertState, SlidingCount

RULES = AlertRules(
    failure_rate=0.05, retry_budget=0.2, window_s=60, min_items=20, batch_sla_s=3600, cooldown_s=120
)


def test_sliding_count_forgets_what_left_the_window() -> None:
    counts = SlidingCount(60, buckets=6)
    counts.add(0, "error", 5)
    counts.add(30, "error", 1)
    assert counts.total(30, "error") == 6
    assert counts.total(65, "error") == 1
    assert counts.total(200, "error") == 0


def test_failure_rate_fires_above_the_threshold_once_per_cooldown() -> None:
    state = AlertState(RULES)
    fired = [state.outcome(float(i) / 10, ok=i % 10 != 0) for i in range(100)]  # 10% errors
    alerts = [a for a in fired if a is not None]
    assert len(alerts) == 1 and alerts[0].kind == "failure_rate"
    assert alerts[0].details["results"] >= 20 and alerts[0].details["rate"] > 0.05
    # still failing after the cooldown: fires again
    later = [state.outcome(200 + i / 10, ok=i % 5 != 0) for i in range(50)]
    assert sum(a is not None for a in later) == 1


def test_failure_rate_needs_enough_results_and_ignores_low_rates() -> None:
    state = AlertState(RULES)
    assert all(state.outcome(i, ok=False) is None for i in range(19))  # below min_items
    state = AlertState(RULES)
    assert all(state.outcome(i / 10, ok=i % 25 != 24) is None for i in range(500))  # 4%


def test_retry_budget() -> None:
    state = AlertState(RULES)
    for i in range(50):
        assert state.call(i / 10, retry=False) is None
    alerts = [state.call(5 + i / 10, retry=True) for i in range(11)]  # 11 retries for 50 calls
    fired = [a for a in alerts if a is not None]
    assert len(fired) == 1 and fired[0].kind == "retry_budget" and fired[0].details["retries"] == 11


def test_batch_sla_per_batch_with_cooldown() -> None:
    state = AlertState(RULES)
    batches = [("batch_old", 1000.0), ("batch_new", 4000.0)]
    alerts = state.batch_ages(0, 5000.0, batches)
    assert [a.key for a in alerts] == ["batch_old"] and alerts[0].details["age_s"] == 4000
    assert state.batch_ages(60, 5060.0, batches) == []  # within cooldown
    assert [a.key for a in state.batch_ages(200, 8000.0, batches)] == ["batch_old", "batch_new"]
