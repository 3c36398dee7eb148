"""Token buckets: table-driven, with time passed in."""

from __future__ import annotations

import pytest

from service.core.ratelimit import Bucket, Limits, refill, reserve, settle, tighten

# A whole minute of burst and no headroom: the bucket arithmetic in round numbers.
L = Limits(rpm=60, tpm=6000, urgent_reserve=0.1, burst_s=60, headroom=0.0)


def test_full_bucket_serves_until_empty_then_says_how_long() -> None:
    b = Bucket.full(L, 0.0)
    served = 0
    while True:
        b, wait = reserve(b, L, 0.0, tokens=100, urgent=True)
        if wait:
            break
        served += 1
    assert served == 60  # 60 requests, 6000 tokens: both run out together
    assert wait == pytest.approx(1.0)  # one request per second refills


def test_refill_is_continuous_and_capped() -> None:
    b = Bucket(0, 0, 0.0)
    assert refill(b, L, 30.0) == Bucket(30, 3000, 30.0)
    assert refill(b, L, 600.0) == Bucket(60, 6000, 600.0)


def test_urgent_reserve_is_kept_from_bulk_work() -> None:
    b = Bucket(6, 6000, 0.0)  # 10 % of 60 requests left
    _, wait = reserve(b, L, 0.0, tokens=10, urgent=False)
    assert wait > 0
    _, wait = reserve(b, L, 0.0, tokens=10, urgent=True)
    assert wait == 0


def test_tokens_limit_and_oversized_requests() -> None:
    b = Bucket(60, 500, 0.0)
    _, wait = reserve(b, L, 0.0, tokens=1100, urgent=True)
    assert wait == pytest.approx((1100 - 500) * 60 / 6000)
    # a request larger than the whole window waits for a full bucket, never forever
    full = Bucket.full(L, 0.0)
    after, wait = reserve(full, L, 0.0, tokens=10_000, urgent=True)
    assert wait == 0 and after.tokens == 0


def test_settle_refunds_or_charges_the_difference() -> None:
    b = Bucket(10, 1000, 0.0)
    assert settle(b, L, 0.0, estimated=500, actual=200).tokens == 1300
    assert settle(b, L, 0.0, estimated=200, actual=500).tokens == 700


def test_no_limits_never_wait() -> None:
    free = Limits(None, None)
    b, wait = reserve(Bucket.full(free, 0.0), free, 0.0, tokens=10**6, urgent=False)
    assert wait == 0


def test_provider_headers_tighten_but_never_loosen() -> None:
    assert tighten(L, provider_rpm=30, provider_tpm=10_000) == Limits(30, 6000, 0.1, burst_s=60, headroom=0.0)
    assert tighten(Limits(None, None), provider_rpm=500, provider_tpm=None) == Limits(500, None, 0.1)


# -- the defaults: a short burst and a little headroom ------------------------------------

D = Limits(rpm=600, tpm=200_000)  # burst_s=1, headroom=0.04


def grant_times(limits: Limits, *, tokens: int, until_s: float) -> list[float]:
    """Greedy demand: ask again the moment the bucket says so, from a full bucket at 0."""
    b, now, out = Bucket.full(limits, 0.0), 0.0, []
    while now < until_s:
        b, wait = reserve(b, limits, now, tokens=tokens, urgent=True)
        if wait:
            now += wait
        else:
            out.append(now)
    return out


def busiest_minute(times: list[float], weight: int = 1) -> int:
    """Most grants in any rolling 60 s, as a rolling-window limiter counts them."""
    best, lo = 0, 0
    for hi, t in enumerate(times):
        while times[lo] <= t - 60:
            lo += 1
        best = max(best, (hi - lo + 1) * weight)
    return best


def test_default_capacity_is_a_second_of_the_limit() -> None:
    assert (D.request_capacity, D.token_capacity) == (10, pytest.approx(200_000 / 60))
    assert Limits(rpm=20, tpm=None).request_capacity == 1  # never less than one request
    b = Bucket.full(D, 0.0)
    served = 0
    while (step := reserve(b, D, 0.0, tokens=100, urgent=True))[1] == 0:
        b, served = step[0], served + 1
    assert served == 10
    assert step[1] == pytest.approx(60 / (0.96 * 600))


@pytest.mark.parametrize(
    ("tokens", "binds", "limit"),
    [(120, "requests", 600), (1012, "tokens", 200_000)],
)
def test_sustained_rate_is_just_under_the_limit_in_every_rolling_minute(
    tokens: int, binds: str, limit: int
) -> None:
    times = grant_times(D, tokens=tokens, until_s=300)
    weight = 1 if binds == "requests" else tokens
    rate_per_min = len(times) * weight / 5
    assert 0.95 * limit <= rate_per_min <= 0.97 * limit
    # burst + refill stays under the limit with room for jitter, from the very first minute
    assert busiest_minute(times, weight) <= 0.98 * limit


def test_oversized_request_waits_for_a_full_bucket_then_leaves_debt() -> None:
    lim = Limits(rpm=None, tpm=60_000)  # 1,000 tokens of capacity, 960 tokens/s
    b, wait = reserve(Bucket(0, 500, 0.0), lim, 0.0, tokens=5000, urgent=True)
    assert wait == pytest.approx(500 / 960)
    b, wait = reserve(Bucket.full(lim, 0.0), lim, 0.0, tokens=5000, urgent=True)
    assert wait == 0 and b.tokens == -4000
    _, wait = reserve(b, lim, 0.0, tokens=100, urgent=True)
    assert wait == pytest.approx(4100 / 960)


def test_bulk_work_can_always_use_a_full_bucket() -> None:
    small = Limits(rpm=30, tpm=None)  # capacity: one request, no room for a reserve
    assert reserve(Bucket.full(small, 0.0), small, 0.0, tokens=1, urgent=False)[1] == 0
    b = Bucket(1.5, D.token_capacity, 0.0)  # default: one request of the ten is kept for urgent work
    assert reserve(b, D, 0.0, tokens=1, urgent=False)[1] > 0
    assert reserve(b, D, 0.0, tokens=1, urgent=True)[1] == 0


def test_settle_never_overfills_the_bucket() -> None:
    b = Bucket.full(D, 0.0)
    assert settle(b, D, 0.0, estimated=1000, actual=10).tokens == D.token_capacity
