"""Per-model RPM/TPM limits over a rolling window. PURE: the caller passes ``now``.

A request is admitted when, counting only admitted requests of the last ``window_s``
seconds, one more request fits under ``rpm`` and its tokens fit under ``tpm``. Rejected
requests are not recorded, so ``retry_after_s`` is exact: waiting that long frees
enough capacity for the same request (as long as nothing else is admitted meanwhile).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

WINDOW_S = 60.0


def format_duration(seconds: float) -> str:
    """Go-style durations as OpenAI sends them: ``20ms``, ``1s``, ``17.28s``, ``6m0s``, ``1h2m3s``."""
    millis = round(max(seconds, 0.0) * 1000)
    if millis == 0:
        return "0s"
    if millis < 1000:
        return f"{millis}ms"
    hours, rest = divmod(millis, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    secs = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


@dataclass(frozen=True)
class LimitDecision:
    """Outcome of one admission check, with the ``x-ratelimit-*`` headers to send."""

    allowed: bool
    kind: str | None = None  # "requests" | "tokens" when refused
    retry_after_s: float | None = None  # None when the request can never fit (too large)
    limit: int = 0
    used: int = 0
    requested: int = 0
    headers: dict[str, str] = field(default_factory=dict)


@dataclass
class _Window:
    events: deque[tuple[float, int]] = field(default_factory=deque)
    tokens: int = 0

    def prune(self, now: float, window_s: float) -> None:
        while self.events and self.events[0][0] <= now - window_s:
            self.tokens -= self.events.popleft()[1]


class RateLimiter:
    """Rolling-window limiter keyed by model name."""

    def __init__(self, window_s: float = WINDOW_S) -> None:
        self._window_s = window_s
        self._windows: dict[str, _Window] = {}

    def reset(self) -> None:
        self._windows.clear()

    def check(self, key: str, tokens: int, *, rpm: int | None, tpm: int | None, now: float) -> LimitDecision:
        """Admit (and record) or refuse one request of ``tokens`` tokens at time ``now``."""
        window = self._windows.setdefault(key, _Window())
        window.prune(now, self._window_s)
        used_requests, used_tokens = len(window.events), window.tokens
        if rpm is not None and used_requests + 1 > rpm:
            wait = self._wait_for_requests(window, used_requests + 1 - rpm, now)
            return self._refuse(window, "requests", wait, rpm, used_requests, 1, rpm, tpm, now)
        if tpm is not None and tokens > tpm:
            return self._refuse(window, "tokens", None, tpm, used_tokens, tokens, rpm, tpm, now)
        if tpm is not None and used_tokens + tokens > tpm:
            wait = self._wait_for_tokens(window, used_tokens + tokens - tpm, now)
            return self._refuse(window, "tokens", wait, tpm, used_tokens, tokens, rpm, tpm, now)
        if rpm is not None or tpm is not None:
            window.events.append((now, tokens))
            window.tokens += tokens
        return LimitDecision(allowed=True, headers=self._headers(window, rpm, tpm, now))

    def _refuse(
        self,
        window: _Window,
        kind: str,
        wait: float | None,
        limit: int,
        used: int,
        requested: int,
        rpm: int | None,
        tpm: int | None,
        now: float,
    ) -> LimitDecision:
        return LimitDecision(
            allowed=False,
            kind=kind,
            retry_after_s=wait,
            limit=limit,
            used=used,
            requested=requested,
            headers=self._headers(window, rpm, tpm, now),
        )

    def _wait_for_requests(self, window: _Window, excess: int, now: float) -> float:
        # The excess-th oldest admitted request must leave the window.
        oldest = window.events[excess - 1][0]
        return max(oldest + self._window_s - now, 0.0)

    def _wait_for_tokens(self, window: _Window, excess: int, now: float) -> float:
        freed = 0
        for at, tokens in window.events:
            freed += tokens
            if freed >= excess:
                return max(at + self._window_s - now, 0.0)
        return self._window_s  # pragma: no cover - unreachable: excess <= window.tokens

    def _headers(self, window: _Window, rpm: int | None, tpm: int | None, now: float) -> dict[str, str]:
        # "reset" = time until the window is empty again, i.e. back to its initial state.
        reset = max(window.events[-1][0] + self._window_s - now, 0.0) if window.events else 0.0
        headers: dict[str, str] = {}
        if rpm is not None:
            headers["x-ratelimit-limit-requests"] = str(rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(rpm - len(window.events), 0))
            headers["x-ratelimit-reset-requests"] = format_duration(reset)
        if tpm is not None:
            headers["x-ratelimit-limit-tokens"] = str(tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(tpm - window.tokens, 0))
            headers["x-ratelimit-reset-tokens"] = format_duration(reset)
        return headers
