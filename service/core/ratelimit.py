"""Token buckets for requests and tokens per minute, pure: state in, state out, time
passed in. The shared copy lives in JetStream KV (service/state/limits.py) and is updated
with compare-and-set, so every replica draws from one bucket.

Capacity is a full minute of the limit (a request larger than TPM/60 still fits), refill
is continuous. A share of the capacity (``urgent_reserve``) can only be taken by urgent
work, so bulk traffic never starves it when the limit is tight."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    rpm: float | None
    tpm: float | None
    urgent_reserve: float = 0.1


@dataclass(frozen=True)
class Bucket:
    requests: float
    tokens: float
    at: float

    @classmethod
    def full(cls, limits: Limits, now: float) -> Bucket:
        return cls(limits.rpm or 0.0, limits.tpm or 0.0, now)


def refill(bucket: Bucket, limits: Limits, now: float) -> Bucket:
    elapsed = max(0.0, now - bucket.at)
    requests = min(limits.rpm, bucket.requests + elapsed * limits.rpm / 60) if limits.rpm else 0.0
    tokens = min(limits.tpm, bucket.tokens + elapsed * limits.tpm / 60) if limits.tpm else 0.0
    return Bucket(requests, tokens, now)


def _wait(have: float, need: float, limit: float | None) -> float:
    if not limit or have >= need:
        return 0.0
    return (need - have) * 60 / limit


def reserve(bucket: Bucket, limits: Limits, now: float, *, tokens: int, urgent: bool) -> tuple[Bucket, float]:
    """Take one request and ``tokens`` tokens. Returns the new bucket and 0.0, or the
    unchanged (refilled) bucket and how long to wait before asking again."""
    current = refill(bucket, limits, now)
    floor = 0.0 if urgent else limits.urgent_reserve
    need_requests = 1 + floor * (limits.rpm or 0)
    # A request bigger than the whole reserve-adjusted window would never fit: cap the need.
    need_tokens = min(tokens + floor * (limits.tpm or 0), limits.tpm or 0)
    wait = max(
        _wait(current.requests, need_requests, limits.rpm), _wait(current.tokens, need_tokens, limits.tpm)
    )
    if wait > 0:
        return current, wait
    taken = Bucket(
        current.requests - 1 if limits.rpm else 0.0,
        current.tokens - min(tokens, limits.tpm or 0) if limits.tpm else 0.0,
        now,
    )
    return taken, 0.0


def settle(bucket: Bucket, limits: Limits, now: float, *, estimated: int, actual: int) -> Bucket:
    """Correct the reservation once ``usage`` says what the call really cost."""
    current = refill(bucket, limits, now)
    if not limits.tpm:
        return current
    tokens = min(limits.tpm, current.tokens + estimated - actual)
    return Bucket(current.requests, tokens, now)


def tighten(limits: Limits, *, provider_rpm: float | None, provider_tpm: float | None) -> Limits:
    """Adopt the provider's ``x-ratelimit-limit-*`` when they are lower than configured."""
    rpm = min(x for x in (limits.rpm, provider_rpm) if x) if (limits.rpm or provider_rpm) else None
    tpm = min(x for x in (limits.tpm, provider_tpm) if x) if (limits.tpm or provider_tpm) else None
    return Limits(rpm, tpm, limits.urgent_reserve)
