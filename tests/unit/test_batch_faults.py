"""service.core.batch_faults: the pure decisions for permanent provider failures."""

from __future__ import annotations

import pytest

from service.core.batch_faults import (
    MAX_BACKOFF_S,
    End,
    Fault,
    Resubmit,
    Retry,
    backoff_s,
    is_permanent,
    on_permanent_failure,
)
from service.core.provider_errors import classify_status

T0 = 1_000_000.0


@pytest.mark.parametrize(
    ("status", "permanent"),
    [
        (400, True),
        (401, True),
        (403, True),
        (404, True),
        (408, False),
        (429, False),
        (500, False),
        (503, False),
    ],
)
def test_provider_statuses_classify_as_permanent_or_transient(status: int, permanent: bool) -> None:
    assert is_permanent(classify_status(status, None, "m", {}).retryable) is permanent


@pytest.mark.parametrize(
    ("count", "expected"), [(1, 2.0), (2, 4.0), (3, 8.0), (8, 256.0), (9, MAX_BACKOFF_S), (60, MAX_BACKOFF_S)]
)
def test_backoff_doubles_and_is_capped(count: int, expected: float) -> None:
    assert backoff_s(2.0, count) == expected


def decide(step: str, code: str, current: Fault | None, now: float, lost: int = 0) -> object:
    return on_permanent_failure(
        step,  # type: ignore[arg-type]
        code,
        "msg",
        current=current,
        now=now,
        give_up_after_s=60.0,
        base_s=2.0,
        lost_batches=lost,
        max_lost=3,
    )


def test_a_first_failure_starts_a_run_and_alerts() -> None:
    assert decide("submit", "auth_failed", None, T0) == Retry(
        T0 + 2.0, Fault("submit", "auth_failed", T0, 1), True
    )


def test_later_failures_of_the_run_back_off_without_alerting() -> None:
    current = Fault("submit", "auth_failed", T0, 3)
    assert decide("submit", "auth_failed", current, T0 + 20) == Retry(
        T0 + 36.0, Fault("submit", "auth_failed", T0, 4), False
    )


def test_the_retry_never_lands_after_the_deadline() -> None:
    current = Fault("submit", "auth_failed", T0, 5)  # backoff 64 s > 10 s left
    decision = decide("submit", "auth_failed", current, T0 + 50)
    assert isinstance(decision, Retry) and decision.retry_at == T0 + 60.0


@pytest.mark.parametrize(
    ("current", "why"),
    [
        (Fault("follow", "auth_failed", T0 - 500, 9), "another step"),
        (Fault("submit", "permission_denied", T0 - 500, 9), "another code"),
    ],
)
def test_a_failure_of_another_step_or_code_starts_a_new_run(current: Fault, why: str) -> None:
    decision = decide("submit", "auth_failed", current, T0)
    assert isinstance(decision, Retry) and decision.first and decision.fault.since == T0, why


@pytest.mark.parametrize(
    ("step", "code", "lost", "expected"),
    [
        ("submit", "auth_failed", 0, End),
        ("submit", "permission_denied", 0, End),
        ("submit", "not_found", 0, End),
        ("follow", "auth_failed", 0, End),
        ("follow", "not_found", 0, Resubmit("batch_lost")),
        ("download", "not_found", 0, Resubmit("output_lost")),
        ("download", "not_found", 1, Resubmit("output_lost")),
        ("download", "not_found", 2, End),  # the third lost batch (max_lost = 3)
        ("follow", "not_found", 2, End),
    ],
)
def test_after_the_bound_the_flush_ends(step: str, code: str, lost: int, expected: object) -> None:
    decision = decide(step, code, Fault(step, code, T0, 7), T0 + 60.0, lost)
    if expected is End:
        assert isinstance(decision, End)
        assert decision.code == ("batch_lost" if code == "not_found" and step != "submit" else code)
        assert decision.retryable is (decision.code == "batch_lost")
        assert "msg" in decision.message
    else:
        assert decision == expected


def test_a_zero_bound_ends_at_the_first_failure() -> None:
    decision = on_permanent_failure(
        "submit",
        "auth_failed",
        "m",
        current=None,
        now=T0,
        give_up_after_s=0.0,
        base_s=1.0,
        lost_batches=0,
        max_lost=5,
    )
    assert isinstance(decision, End) and decision.code == "auth_failed" and not decision.retryable


def test_emulator_one_shot_faults_forget_and_output_404() -> None:
    from service.emulator.config import FaultConfig
    from service.emulator.faults import plan_batch_faults

    assert plan_batch_faults(FaultConfig(), "forget").forget
    assert plan_batch_faults(FaultConfig(), "output_404").output_404
    plain = plan_batch_faults(FaultConfig(), None)
    assert not plain.forget and not plain.output_404
    assert FaultConfig(file_upload_status=401).file_upload_status == 401
    with pytest.raises(ValueError):
        FaultConfig(file_upload_status=200)
