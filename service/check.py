"""``enrichd check``: the configuration is valid (it loaded), NATS answers, the provider
accepts our key. Prints one line per check; returns whether all passed."""

from __future__ import annotations

from collections.abc import Callable

import nats

from service.nats_embedded import EmbeddedNatsError, find_binary
from service.natsconn import connect_kwargs, servers
from service.providers.openai_sync import OpenAISyncProvider, classify_exception
from service.settings import Settings


async def run_check(settings: Settings, say: Callable[[str], None]) -> bool:
    say(f"ok   configuration: {len(settings.registry)} handlers ({', '.join(sorted(settings.registry))})")
    ok = await _check_nats(settings, say)
    return await _check_provider(settings, say) and ok


async def _check_nats(settings: Settings, say: Callable[[str], None]) -> bool:
    if settings.nats.embedded:
        try:
            binary = find_binary()
        except EmbeddedNatsError as exc:
            say(f"FAIL nats: {exc}")
            return False
        url = f"nats://127.0.0.1:{settings.nats.embedded_port}"
        try:
            nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0, allow_reconnect=False)
        except Exception:  # noqa: BLE001
            say(f"ok   nats: embedded server ({binary}) will be started by 'enrichd run' on {url}")
            return True
        await nc.close()
        say(f"ok   nats: embedded server of a running daemon answers on {url}")
        return True
    try:
        nc = await nats.connect(
            servers(settings.nats.url or ""),
            connect_timeout=5,
            max_reconnect_attempts=0,
            allow_reconnect=False,
            **connect_kwargs(settings.nats),
        )
    except Exception as exc:  # noqa: BLE001
        say(f"FAIL nats: cannot connect to {settings.nats.url}: {type(exc).__name__}: {exc}")
        return False
    try:
        js = nc.jetstream()
        info = await js.account_info()
        say(
            f"ok   nats: connected to {nc.connected_url.netloc if nc.connected_url else settings.nats.url}, "
            f"JetStream has {info.streams} stream(s)"
        )
        return True
    except Exception as exc:  # noqa: BLE001
        say(f"FAIL nats: connected but JetStream is not available: {exc}")
        return False
    finally:
        await nc.close()


async def _check_provider(settings: Settings, say: Callable[[str], None]) -> bool:
    if settings.openai.use_emulator:
        say("ok   provider: none configured; 'enrichd run' starts the built-in emulator (synthetic results)")
        return True
    key = settings.openai.api_key.get_secret_value() if settings.openai.api_key else None
    provider = OpenAISyncProvider(
        base_url=settings.openai.base_url, api_key=key, timeout_s=15, max_concurrency=1
    )
    try:
        page = await provider.client.models.list()
        count = len(page.data)
        url = settings.openai.base_url or "https://api.openai.com/v1"
        say(f"ok   provider: {url} answers ({count} models)")
        return True
    except Exception as exc:  # noqa: BLE001
        err = classify_exception(exc)
        say(f"FAIL provider: {err.code}: {err.message}")
        return False
    finally:
        await provider.close()
