"""Pipelines on the intake side (CONTRACT §14): an item fed to a pipeline whose final
answer is stored, and a request on ``enrich.sync.<pipeline>``, which runs every step at
once. A pipeline fed on the stream runs one step per message instead (the step's ending
publishes the next: finish.py, batch/publisher.py)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

from service.core import chain as chain_core
from service.core.errors import EnrichError
from service.core.intake import Prepared, prepare_next
from service.pipeline.config import PipelineConfig
from service.pipeline.finish import Finish
from service.pipeline.ports import Store


class Chained:
    def __init__(
        self,
        *,
        config: PipelineConfig,
        store: Store,
        finish: Finish,
        clock: Callable[[], datetime],
        answer_step: Callable[[Prepared], Awaitable[dict[str, Any]]],
        finish_bad: Callable[[Prepared, EnrichError], Awaitable[dict[str, Any]]],
    ) -> None:
        self._config = config
        self._store = store
        self._finish = finish
        self._clock = clock
        self._answer_step = answer_step
        self._finish_bad = finish_bad

    async def answered(self, prepared: Prepared) -> dict[str, Any] | None:
        """An item fed to a pipeline whose final answer (same id, same pipeline version)
        is stored: answered from the store, no step runs."""
        chain, item = prepared.chain, prepared.item
        assert chain is not None and item is not None
        pipeline = self._config.pipelines[chain.pipeline]
        stored = await self._store.get(pipeline.name, item.id, pipeline.version)
        if stored is None:
            return None
        as_fed = dataclasses.replace(item, handler=pipeline.name)
        return await self._finish.from_store(prepared.intake, as_fed, stored)

    async def run_here(self, prepared: Prepared) -> dict[str, Any] | None:
        """A request on ``enrich.sync.<pipeline>``: every step at once, on the sync route,
        one after the other; the reply is the pipeline's final event. Each step's answer
        is stored as it comes (a later request for the same item pays nothing again)."""
        request_id = uuid.uuid4().hex
        if prepared.error is None:
            answered = await self.answered(prepared)
            if answered is not None:
                return answered
        current = prepared
        while True:
            chain, item = current.chain, current.item
            assert chain is not None
            if current.error is not None:
                if item is None:  # the item itself is bad: an ordinary bad-item ending
                    return await self._finish_bad(current, current.error)
                step_event = await self._finish_bad(current, current.error)
            else:
                step_event = await self._answer_step(current)
            pipeline = self._config.pipelines[chain.pipeline]
            after = chain_core.after_step(pipeline, chain, step_event, now=self._clock())
            if isinstance(after, chain_core.Final):
                return await self._finish.final(after, chain, request_id=request_id)
            current = prepare_next(
                current.intake,
                after.state,
                pipeline,
                self._config.registry,
                max_tokens_param=self._config.max_tokens_param,
            )
