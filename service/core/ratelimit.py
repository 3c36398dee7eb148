"""Token buckets for requests and tokens per minute, pure: state in, state out, time
passed in. The shared copy lives in JetStream KV (service/state/limits.py) and is updated
with compare-and-set, so every replica draws from one bucket.

Shape of the bucket, and why:

- Refill is continuous at ``1 - headroom`` of the limit. The provider counts a call when
  it arrives, we count it when we grant it; the difference varies (scheduling, HTTP), so a
  bucket refilled at exactly the limit keeps every rolling minute at the limit and lets
  jitter push some calls over it (429). A few percent of headroom absorbs that.
- Capacity is only ``burst_s`` seconds of the limit (at least one request), not a whole
  minute. Providers enforce per-minute limits over shorter periods (OpenAI: "60,000 requests
  per minute may be enforced as 1,000 requests per second"), and a limiter counting a
  rolling minute refuses everything for a minute after a minute's worth went out at once.
  What a full bucket can send plus what refills in a minute (``capacity + (1 - headroom) *
  limit``) therefore stays under the limit in every minute.
- A request larger than the token capacity waits for a full bucket, then leaves it in debt
  (negative) so the calls after it wait until the average is back under the limit.
- A share of the capacity (``urgent_reserve``) can only be taken by urgent work: bulk work
  needs that much more in the bucket (capped at the capacity), so urgent calls get
  through first when both wait."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass


@dataclass(frozen=True)
class Limits:
    rpm: float | None
    tpm: float | None
    urgent_reserve: float = 0.1
    burst_s: float = 1.0
    """Capacity in seconds of the limit (the largest burst)."""
    headroom: float = 0.04
    """Share of the limit left unused to absorb timing differences with the provider."""

    @property
    def request_capacity(self) -> float:
        return max(1.0, self.burst_s * self.rpm / 60) if self.rpm else 0.0

    @property
    def token_capacity(self) -> float:
        return self.burst_s * self.tpm / 60 if self.tpm else 0.0

    def per_s(self, limit: float | None) -> float:
        """Refill rate for ``limit`` (per minute), headroom taken off."""
        return (1 - self.headroom) * limit / 60 if limit else 0.0


@dataclass(frozen=True)
class Bucket:
    requests: float
    tokens: float
    at: float

    @classmethod
    def full(cls, limits: Limits, now: float) -> Bucket:
        return cls(limits.request_capacity, limits.token_capacity, now)


def refill(bucket: Bucket, limits: Limits, now: float) -> Bucket:
    elapsed = max(0.0, now - bucket.at)
    requests = (
        min(limits.request_capacity, bucket.requests + elapsed * limits.per_s(limits.rpm))
        if limits.rpm
        else 0.0
    )
    tokens = (
        min(limits.token_capacity, bucket.tokens + elapsed * limits.per_s(limits.tpm)) if limits.tpm else 0.0
    )
    return Bucket(requests, tokens, now)


def _wait(have: float, need: float, per_s: float) -> float:
    # The tolerance absorbs float rounding in refill: without it a caller told to wait
    # exactly long enough can find the bucket a hair short and be told to wait ~0 s again.
    if not per_s or have >= need - 1e-9 * max(1.0, need):
        return 0.0
    return (need - have) / per_s


def reserve(bucket: Bucket, limits: Limits, now: float, *, tokens: int, urgent: bool) -> tuple[Bucket, float]:
    """Take one request and ``tokens`` tokens. Returns the new bucket and 0.0, or the
    unchanged (refilled) bucket and how long to wait before asking again."""
    current = refill(bucket, limits, now)
    floor = 0.0 if urgent else limits.urgent_reserve
    req_cap, tok_cap = limits.request_capacity, limits.token_capacity
    # Never ask for more than a full bucket, or the request could never go.
    need_requests = min(1 + floor * req_cap, req_cap)
    need_tokens = min(tokens + floor * tok_cap, tok_cap)
    wait = max(
        _wait(current.requests, need_requests, limits.per_s(limits.rpm)),
        _wait(current.tokens, need_tokens, limits.per_s(limits.tpm)),
    )
    if wait > 0:
        return current, wait
    taken = Bucket(
        current.requests - 1 if limits.rpm else 0.0,
        # beyond a minute's worth the provider refuses the call anyway ("request too large")
        current.tokens - min(tokens, limits.tpm or 0) if limits.tpm else 0.0,
        now,
    )
    return taken, 0.0


def settle(bucket: Bucket, limits: Limits, now: float, *, estimated: int, actual: int) -> Bucket:
    """Correct the reservation once ``usage`` says what the call really cost."""
    current = refill(bucket, limits, now)
    if not limits.tpm:
        return current
    tokens = min(limits.token_capacity, current.tokens + estimated - actual)
    return Bucket(current.requests, tokens, now)


def tighten(limits: Limits, *, provider_rpm: float | None, provider_tpm: float | None) -> Limits:
    """Adopt the provider's ``x-ratelimit-limit-*`` when they are lower than configured."""
    rpm = min(x for x in (limits.rpm, provider_rpm) if x) if (limits.rpm or provider_rpm) else None
    tpm = min(x for x in (limits.tpm, provider_tpm) if x) if (limits.tpm or provider_tpm) else None
    return dataclasses.replace(limits, rpm=rpm, tpm=tpm)
