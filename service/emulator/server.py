"""The aiohttp application, the :class:`Emulator` handle and :func:`run_forever`."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

from aiohttp import web
from pydantic import ValidationError

from . import errors, ids
from .batch_runner import BatchRunner
from .config import EmulatorConfig, FaultConfig
from .errors import EmulatedError
from .http_common import read_json
from .routes_batches import BatchRoutes
from .routes_files import FileRoutes
from .routes_sync import SyncRoutes
from .state import EmulatorState

logger = logging.getLogger("enrichd.emulator")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_MAX_JSON_BODY_BYTES = 64 * 1024 * 1024
_SHUTDOWN_TIMEOUT_S = 2.0


class Emulator:
    """An OpenAI-compatible HTTP server running inside the current event loop.

    >>> emu = Emulator(EmulatorConfig(batch_delay_s=0.5))
    >>> base_url = await emu.start()          # "http://127.0.0.1:<port>/v1"
    >>> emu.set_faults(FaultConfig(script=[429, 0]))
    >>> await emu.stop()

    One instance serves one start/stop cycle. All state (files, batches) is in memory.
    """

    def __init__(
        self, config: EmulatorConfig | None = None, *, clock: Callable[[], float] | None = None
    ) -> None:
        """``clock`` (monotonic seconds) drives the RPM/TPM windows; tests may pass a fake one."""
        self.config = config or EmulatorConfig()
        self._state = EmulatorState(self.config, clock=clock or time.monotonic)
        self._batch_runner = BatchRunner(self._state)
        self._web_runner: web.AppRunner | None = None
        self._base_url: str | None = None

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Listen on ``host:port`` (0 = a free port) and return the base URL ending in ``/v1``."""
        if self._web_runner is not None:
            raise RuntimeError("emulator already started")
        runner = web.AppRunner(
            self._build_app(),
            access_log=None,
            handler_cancellation=True,
            shutdown_timeout=_SHUTDOWN_TIMEOUT_S,
        )
        await runner.setup()
        site = web.TCPSite(runner, host, port)
        await site.start()
        self._web_runner = runner
        bound_port = runner.addresses[0][1]
        shown_host = f"[{host}]" if ":" in host else host
        self._base_url = f"http://{shown_host}:{bound_port}/v1"
        logger.info("emulator listening on %s", self._base_url)
        return self._base_url

    async def stop(self) -> None:
        """Stop batch tasks and the server; sleeping requests (timeouts, latency) end at once."""
        self._state.stopping.set()
        await self._batch_runner.close()
        if self._web_runner is not None:
            await self._web_runner.cleanup()
            self._web_runner = None
            logger.info("emulator stopped")

    async def __aenter__(self) -> Emulator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.stop()

    # --- control -----------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        """``http://host:port/v1`` once started."""
        if self._base_url is None:
            raise RuntimeError("emulator not started")
        return self._base_url

    @property
    def faults(self) -> FaultConfig:
        """The faults currently in force."""
        return self._state.faults

    def set_faults(self, faults: FaultConfig) -> None:
        """Replace all faults (re-seeds the draws and restarts ``script``/``batch_faults_next``)."""
        self._state.set_faults(faults)
        logger.info("emulator faults set: %s", faults.model_dump(exclude_defaults=True))

    @property
    def stats(self) -> dict[str, Any]:
        """A snapshot of the counters (see ``README.md``)."""
        return self._state.stats.snapshot()

    def reset_stats(self) -> None:
        self._state.stats.reset()

    def clear_prompt_cache(self) -> None:
        """Forget every cached prompt prefix (the next requests report 0 cached tokens)."""
        self._state.prompt_cache.clear()

    # --- HTTP ---------------------------------------------------------------------------

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._envelope, self._auth], client_max_size=_MAX_JSON_BODY_BYTES)
        SyncRoutes(self._state).register(app.router)
        FileRoutes(self._state).register(app.router)
        BatchRoutes(self._state, self._batch_runner).register(app.router)
        app.router.add_get("/_emulator/stats", self._get_stats)
        app.router.add_post("/_emulator/reset", self._reset)
        app.router.add_get("/_emulator/faults", self._get_faults)
        app.router.add_post("/_emulator/faults", self._post_faults)
        return app

    @web.middleware
    async def _envelope(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Every answer: OpenAI error envelope on failure, ``x-request-id``, counters."""
        started = time.perf_counter()
        try:
            response = await handler(request)
        except EmulatedError as error:
            response = web.json_response(error.body(), status=error.status, headers=error.headers)
        except web.HTTPException as exc:
            response = _from_http_exception(request, exc)
        except Exception:
            logger.exception("emulator error on %s %s", request.method, request.path)
            response = web.json_response(errors.server_error().body(), status=500)
        response.headers["x-request-id"] = ids.request_id()
        response.headers["openai-processing-ms"] = str(round((time.perf_counter() - started) * 1000))
        if request.path.startswith("/v1"):
            response.headers["openai-version"] = "2020-10-01"
            response.headers["openai-organization"] = self.config.organization
            resource = request.match_info.route.resource
            stats = self._state.stats
            stats.requests[resource.canonical if resource is not None else "unmatched"] += 1
            stats.status_counts[response.status] += 1
        return response

    @web.middleware
    async def _auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        expected = self.config.api_key
        if expected is not None and request.path.startswith("/v1"):
            header = request.headers.get("Authorization", "")
            scheme, _, presented = header.partition(" ")
            presented = presented.strip()
            if not presented:
                raise errors.missing_api_key()
            valid = scheme.lower() == "bearer" and hmac.compare_digest(
                presented.encode(), expected.get_secret_value().encode()
            )
            if not valid:
                raise errors.incorrect_api_key(presented)
        return await handler(request)

    async def _get_stats(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.stats, dumps=lambda v: json.dumps(v, default=str))

    async def _reset(self, request: web.Request) -> web.StreamResponse:
        self.reset_stats()
        return web.json_response({"reset": True})

    async def _get_faults(self, request: web.Request) -> web.StreamResponse:
        return web.json_response(self.faults.model_dump(mode="json"))

    async def _post_faults(self, request: web.Request) -> web.StreamResponse:
        body = await read_json(request)
        try:
            faults = FaultConfig.model_validate(body if body is not None else {})
        except ValidationError as exc:
            raise EmulatedError(
                400, f"Invalid fault configuration: {exc.errors(include_url=False)}"
            ) from None
        self.set_faults(faults)
        return web.json_response(faults.model_dump(mode="json"))


def _from_http_exception(request: web.Request, exc: web.HTTPException) -> web.StreamResponse:
    if exc.status in (404, 405):
        error = EmulatedError(404, f"Invalid URL ({request.method} {request.path})")
    elif exc.status == 413:
        error = EmulatedError(413, "Request entity too large.")
    else:
        error = EmulatedError(exc.status, exc.reason)
    return web.json_response(error.body(), status=error.status)


async def run_forever(host: str, port: int, config: EmulatorConfig) -> None:
    """Serve until cancelled (``enrichd emulator --port N``); logs the base URL."""
    emulator = Emulator(config)
    url = await emulator.start(host, port)
    logger.warning("OpenAI emulator serving at %s: every answer is synthetic", url)
    try:
        await asyncio.Event().wait()
    finally:
        await emulator.stop()
