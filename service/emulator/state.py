"""The mutable state of one emulator instance, shared by its HTTP routes and batch runner."""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections import deque
from collections.abc import Callable

from .batches import BatchStore
from .chat import AnswerContext
from .config import BatchFault, EmulatorConfig, FaultConfig
from .faults import BatchFaultPlan, SyncFault, decide_sync_fault, plan_batch_faults
from .files import FileStore
from .limits import RateLimiter
from .prompt_cache import PromptCache
from .stats import Stats
from .synth import digest


class EmulatorState:
    """Config, current faults and their consumable parts, stores, limiter and stats."""

    def __init__(self, config: EmulatorConfig, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.clock = clock
        self.files = FileStore()
        self.batches = BatchStore()
        self.limiter = RateLimiter()
        self.stats = Stats()
        self.stopping = asyncio.Event()
        self.unknown_models = frozenset(config.unknown_models)
        self.fingerprint = "fp_" + digest("fingerprint", str(config.seed)).hex()[:10]
        self._faults = config.faults
        self._script: deque[int] = deque()
        self._flaky_seen: dict[str, int] = {}
        self._flaky_lock = threading.Lock()
        self._next_batch: deque[BatchFault] = deque()
        self._rng = random.Random(config.seed)
        self._flex_rng = random.Random(f"flex-{config.seed}")
        self._flex_next = 0
        self._pack_drop_next: deque[int] = deque()
        self._pack_lock = threading.Lock()
        self.prompt_cache = PromptCache(
            ttl_s=config.prompt_cache_ttl_s, max_entries=config.prompt_cache_max_entries, clock=clock
        )
        self.flex_models = None if config.flex_models is None else frozenset(config.flex_models)
        self.set_faults(config.faults)

    @property
    def faults(self) -> FaultConfig:
        return self._faults

    def set_faults(self, faults: FaultConfig) -> None:
        """Replace the faults, refill the script queues and re-seed the fault draws."""
        self._faults = faults
        self._script = deque(faults.script)
        self._next_batch = deque(faults.batch_faults_next)
        self._rng = random.Random(self.config.seed)
        self._flex_rng = random.Random(f"flex-{self.config.seed}")
        self._flex_next = faults.flex_unavailable_next
        with self._pack_lock:
            self._pack_drop_next = deque(faults.pack_drop_next)

    def next_sync_fault(self) -> SyncFault:
        # One draw per request, scripted or not, so the n-th request always sees the n-th draw.
        draw = self._rng.random()
        entry = self._script.popleft() if self._script else None
        return decide_sync_fault(self._faults, entry, draw)

    def flex_refused(self) -> bool:
        """Whether this flex request is refused: one-shots first, then one seeded draw."""
        draw = self._flex_rng.random()
        if self._flex_next > 0:
            self._flex_next -= 1
            return True
        rate = self._faults.flex_unavailable_rate
        return rate > 0 and draw < rate

    def flex_supported(self, model: str) -> bool:
        return self.flex_models is None or model in self.flex_models

    def next_pack_drop(self) -> int:
        # Called from the event loop and from batch worker threads.
        with self._pack_lock:
            if self._pack_drop_next:
                return self._pack_drop_next.popleft()
        return self._faults.pack_drop

    def next_batch_plan(self) -> BatchFaultPlan:
        one_shot = self._next_batch.popleft() if self._next_batch else None
        return plan_batch_faults(self._faults, one_shot)

    @property
    def batch_delay_s(self) -> float:
        override = self._faults.batch_delay_s
        return self.config.batch_delay_s if override is None else override

    @property
    def enqueued_token_limit(self) -> int | None:
        override = self._faults.enqueued_token_limit
        return self.config.enqueued_token_limit if override is None else override

    @staticmethod
    def now() -> int:
        """Wall-clock Unix seconds, for ``created``/``*_at`` fields."""
        return int(time.time())

    def answer_context(self, *, batch: bool = False) -> AnswerContext:
        return AnswerContext(
            seed=self.config.seed,
            now=self.now(),
            context_window=self.config.context_window,
            max_output_tokens=self.config.max_output_tokens,
            organization=self.config.organization,
            fingerprint=self.fingerprint,
            flaky=self._flaky,
            prompt_cache=self.prompt_cache.cached_tokens if self.config.prompt_caching else None,
            pack_drop=self.next_pack_drop,
            batch=batch,
        )

    def _flaky(self, text: str, failures: int) -> bool:
        # Called from the event loop and from batch worker threads.
        key = digest("flaky", text).hex()
        with self._flaky_lock:
            seen = self._flaky_seen.get(key, 0)
            self._flaky_seen[key] = seen + 1
        return seen < failures

    async def sleep(self, seconds: float) -> None:
        """Sleep, but wake up at once when the emulator is stopping."""
        if seconds <= 0:
            return
        try:
            await asyncio.wait_for(self.stopping.wait(), timeout=seconds)
        except TimeoutError:
            pass
