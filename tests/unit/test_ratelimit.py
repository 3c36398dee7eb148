"""Token buckets: table-driven, with time passed in."""

from __future__ import annotations

import pytest

from service.core.ratelimit import Bucket, Limits, refill, reserve, settle, tighten

L = Limits(rpm=60, tpm=6000, urgent_reserve=0.1)


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
    assert tighten(L, provider_rpm=30, provider_tpm=10_000) == Limits(30, 6000, 0.1)
    assert tighten(Limits(None, None), provider_rpm=500, provider_tpm=None) == Limits(500, None, 0.1)
