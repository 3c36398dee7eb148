"""Batch API routes: create, retrieve, list, cancel."""

from __future__ import annotations

import logging

from aiohttp import web

from . import errors
from .batch_runner import BatchRunner
from .batches import BatchRecord, parse_create_request
from .errors import EmulatedError
from .http_common import list_body, query_int, read_json
from .state import EmulatorState

logger = logging.getLogger("enrichd.emulator")


class BatchRoutes:
    """Route handlers for ``/v1/batches``."""

    def __init__(self, state: EmulatorState, runner: BatchRunner) -> None:
        self._state = state
        self._runner = runner

    def register(self, router: web.UrlDispatcher) -> None:
        router.add_post("/v1/batches", self.create)
        router.add_get("/v1/batches", self.list)
        router.add_get("/v1/batches/{batch_id}", self.retrieve)
        router.add_post("/v1/batches/{batch_id}/cancel", self.cancel)

    def _json(self, batch: BatchRecord) -> dict[str, object]:
        return batch.to_dict(empty_string_file_ids=self._state.faults.empty_string_file_ids)

    async def create(self, request: web.Request) -> web.StreamResponse:
        state = self._state
        params = parse_create_request(await read_json(request))
        await state.sleep(state.faults.batch_create_latency_s)
        source = state.files.find(params.input_file_id)
        if source is None:
            raise EmulatedError(
                400,
                f"Cannot find file {params.input_file_id}, "
                "or project proj_emulator does not have access to it.",
                param="input_file_id",
            )
        if source.purpose != "batch":
            raise EmulatedError(
                400,
                f"The file {source.id} has purpose '{source.purpose}'; "
                "batch input files need purpose 'batch'.",
                param="input_file_id",
            )
        batch = state.batches.create(params, now=state.now())
        plan = state.next_batch_plan()
        state.stats.batches_created += 1
        state.stats.batch_ids.append(batch.id)
        logger.info(
            "batch %s created (endpoint=%s, input=%s) -> validating", batch.id, batch.endpoint, source.id
        )
        if plan.forget:
            # Answered normally, then lost: never run, never listed, 404 from now on.
            state.stats.faults_injected["batch_forget"] += 1
            answer = self._json(batch)
            state.batches.forget(batch.id)
            logger.info("batch %s forgotten by the provider (fault)", batch.id)
            return web.json_response(answer)
        self._runner.launch(batch, plan, source.data)
        if plan.create_500:
            # The batch exists and runs; only the answer is lost (the duplicate-batch hazard).
            state.stats.faults_injected["batch_create_500"] += 1
            raise errors.server_error()
        return web.json_response(self._json(batch))

    async def list(self, request: web.Request) -> web.StreamResponse:
        limit = query_int(request, "limit", default=20, low=1, high=100)
        batches, has_more = self._state.batches.page(after=request.query.get("after"), limit=limit)
        return web.json_response(list_body([self._json(b) for b in batches], has_more))

    async def retrieve(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self._json(self._state.batches.get(request.match_info["batch_id"])))

    async def cancel(self, request: web.Request) -> web.StreamResponse:
        batch = self._state.batches.get(request.match_info["batch_id"])
        self._runner.cancel(batch)
        return web.json_response(self._json(batch))
