"""With the standard OTEL_EXPORTER_OTLP_ENDPOINT set, the daemon pushes traces and
metrics over OTLP/HTTP (received here by a small collector on loopback)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from tests.conftest import read_stream


async def test_traces_and_metrics_are_pushed_over_otlp(make_daemon, nc, prefix, monkeypatch) -> None:
    received: dict[str, int] = {}

    async def collect(request: web.Request) -> web.Response:
        body = await request.read()
        assert request.headers.get("Content-Type") == "application/x-protobuf" and body
        received[request.path] = received.get(request.path, 0) + 1
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/v1/traces", collect)
    app.router.add_post("/v1/metrics", collect)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
    monkeypatch.setenv("OTEL_METRIC_EXPORT_INTERVAL", "500")
    try:
        daemon = await make_daemon(telemetry={"metrics_port": 0})
        js = nc.jetstream()
        item: dict[str, Any] = {"id": "otlp-1", "text": "pushed over OTLP", "priority": "urgent"}
        await js.publish(f"{prefix}.in.tags", json.dumps(item).encode())
        await read_stream(js, daemon.subjects.stream("OUT"), f"{prefix}.out.tags", 1)
        for _ in range(100):  # the exporters push from their own threads
            if received.get("/v1/traces") and received.get("/v1/metrics"):
                break
            await asyncio.sleep(0.1)
        await daemon.stop()
        assert received.get("/v1/traces", 0) >= 1 and received.get("/v1/metrics", 0) >= 1, received
    finally:
        await runner.cleanup()
