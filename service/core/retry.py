"""Retry policy: exponential backoff with full jitter, honouring ``retry-after``. Pure:
the random source is passed in."""

from __future__ import annotations

import random
from dataclasses import dataclass

from service.core.errors import EnrichError, ProviderError


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    base_s: float = 0.5
    max_backoff_s: float = 30.0
    max_elapsed_s: float = 300.0
    # Waiting out a 429 does not use up an attempt, but at most this many in a row.
    max_rate_limit_waits: int = 50

    def backoff_s(self, attempt: int, rng: random.Random) -> float:
        """Full jitter: uniform in [0, min(cap, base * 2**(attempt-1))]."""
        ceiling = min(self.max_backoff_s, self.base_s * (2 ** max(0, attempt - 1)))
        return rng.uniform(0, ceiling)


@dataclass(frozen=True)
class Decision:
    retry: bool
    delay_s: float = 0.0
    counts_as_attempt: bool = True


def decide(
    policy: RetryPolicy,
    error: EnrichError,
    *,
    attempt: int,
    rate_limit_waits: int,
    elapsed_s: float,
    rng: random.Random,
) -> Decision:
    """What to do after ``error`` on attempt number ``attempt`` (1-based)."""
    if not error.retryable:
        return Decision(retry=False)
    hint = error.retry_after_s if isinstance(error, ProviderError) else None
    rate_limited = error.code == "rate_limited"
    if rate_limited and rate_limit_waits < policy.max_rate_limit_waits:
        delay = hint if hint is not None else policy.backoff_s(rate_limit_waits + 1, rng)
        # A little jitter on top of the server's hint so many waiters do not return at once.
        delay += rng.uniform(0, min(1.0, 0.1 * delay + 0.05))
        counts = False
    else:
        if attempt >= policy.max_attempts:
            return Decision(retry=False)
        backoff = policy.backoff_s(attempt, rng)
        delay = max(hint, backoff) if hint is not None else backoff
        counts = True
    if elapsed_s + delay > policy.max_elapsed_s:
        return Decision(retry=False)
    return Decision(retry=True, delay_s=delay, counts_as_attempt=counts)
