"""Retry policy: exponential backoff with jitter, honouring ``retry-after``, bounded by a
number of calls, a time budget and the item's deadline. Pure: the random source and the
times are passed in."""

from __future__ import annotations

import random
from dataclasses import dataclass

from service.core.errors import EnrichError, ProviderError


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 10
    base_s: float = 0.5
    max_backoff_s: float = 30.0
    # The time budget: no retry starts later than this after the first call. With the
    # defaults, ten calls span more than a minute, so the budget is what ends retrying.
    max_elapsed_s: float = 60.0
    # Waiting out a 429 does not use up an attempt, but at most this many in a row.
    max_rate_limit_waits: int = 50

    def backoff_s(self, attempt: int, rng: random.Random) -> float:
        """Equal jitter: uniform in [c/2, c] with c = min(cap, base * 2**(attempt-1)). Half
        of each wait is fixed, so retries really span the budget (with full jitter a run
        of short draws could spend every attempt in a blip of a few seconds), and the
        other half still spreads many clients apart."""
        ceiling = min(self.max_backoff_s, self.base_s * (2 ** max(0, attempt - 1)))
        return rng.uniform(ceiling / 2, ceiling)


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
    until_deadline_s: float | None = None,
) -> Decision:
    """What to do after ``error`` on attempt number ``attempt`` (1-based), ``elapsed_s``
    after the first call, with ``until_deadline_s`` left before the item's deadline (None:
    no deadline). No retry would start after the budget or the deadline."""
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
    if until_deadline_s is not None and delay > until_deadline_s:
        return Decision(retry=False)
    return Decision(retry=True, delay_s=delay, counts_as_attempt=counts)


def flex_retry_delay(
    policy: RetryPolicy,
    error: EnrichError,
    *,
    attempt: int,
    left_s: float | None,
    lead_s: float,
    rng: random.Random,
) -> float | None:
    """After a failed flex call (CONTRACT §11): the wait before trying flex again, or None
    to go sync now. Flex is tried again only for a transient failure (a refusal with
    ``resource_unavailable`` is one), within ``max_attempts``, and only while the deadline
    still leaves ``lead_s`` after the wait (a whole flex call and a sync fallback)."""
    if not error.retryable or attempt >= policy.max_attempts:
        return None
    hint = error.retry_after_s if isinstance(error, ProviderError) else None
    backoff = policy.backoff_s(attempt, rng)
    delay = max(hint, backoff) if hint is not None else backoff
    if left_s is not None and left_s - delay < lead_s:
        return None
    return delay
