"""``enrichd check``: the configuration is valid (it loaded), NATS answers, the provider
accepts our key. Prints one line per check; returns whether all passed."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from service.broker.connect import NatsUnreachableError, cli_connect, cli_nats_settings, cli_url, describe
from service.broker.embedded import EmbeddedNatsError, find_binary
from service.core.redact import redact_url
from service.providers.openai_sync import OpenAISyncProvider, classify_exception
from service.settings import Settings


async def run_check(settings: Settings, say: Callable[[str], None]) -> bool:
    say(f"ok   configuration: {len(settings.registry)} handlers ({', '.join(sorted(settings.registry))})")
    ok = await _check_nats(settings, say)
    return await _check_provider(settings, say) and ok


async def _check_nats(settings: Settings, say: Callable[[str], None]) -> bool:
    """Within a few seconds, one line: ok, or FAIL naming the URL (never a password)."""
    url = redact_url(cli_url(settings))
    if settings.nats.embedded:
        try:
            binary = find_binary()
        except EmbeddedNatsError as exc:
            say(f"FAIL nats: {exc}")
            return False
        try:
            cli_nats_settings(settings)  # its credentials file, when there is one, is readable
        except NatsUnreachableError as exc:
            say(f"FAIL nats: {exc}")
            return False
        try:
            nc = await cli_connect(settings)
        except NatsUnreachableError:
            say(f"ok   nats: embedded server ({binary}) will be started by 'enrichd run' on {url}")
            return True
        await nc.close()
        say(f"ok   nats: embedded server of a running daemon answers on {url}")
        return True
    try:
        nc = await cli_connect(settings)
    except NatsUnreachableError as exc:
        say(f"FAIL nats: {exc}")
        return False
    try:
        js = nc.jetstream()
        info = await asyncio.wait_for(js.account_info(), 5)
        say(f"ok   nats: connected to {url}, JetStream has {info.streams} stream(s)")
        return True
    except Exception as exc:  # noqa: BLE001
        say(f"FAIL nats: connected to {url} but JetStream is not available: {describe(exc)}")
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
