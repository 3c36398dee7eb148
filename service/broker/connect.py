"""Connection options for NATS from settings, for both FastStream and raw nats-py; URL
redaction; the embedded server's generated credentials; the daemon's reconnect policy
and connection-state log; the command line's bounded, one-line-on-failure connect."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import secrets
import ssl
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import SecretStr

from service.core.redact import redact_url, servers
from service.settings import NatsSettings, Settings

log = logging.getLogger("enrichd.nats")

EMBEDDED_USER = "enrichd"
EMBEDDED_AUTH_FILE = "nats-auth.json"


# ---- embedded server credentials --------------------------------------------------------


@dataclass(frozen=True)
class EmbeddedAuth:
    user: str
    password: str


class NatsAuthError(RuntimeError):
    """The embedded server's credentials file cannot be read or written."""


def embedded_auth_path(state_dir: Path) -> Path:
    return state_dir / EMBEDDED_AUTH_FILE


def ensure_state_dir(state_dir: Path) -> None:
    """The state dir holds credentials: create it 0700 (an existing one is left as is)."""
    if not state_dir.exists():
        state_dir.mkdir(parents=True, mode=0o700)
        os.chmod(state_dir, 0o700)  # mkdir's mode is masked by the umask


def ensure_embedded_auth(state_dir: Path) -> EmbeddedAuth:
    """The embedded server's credentials: generated once into ``<state_dir>/nats-auth.json``
    (mode 0600), then reused, so the command line and a restarted daemon keep working."""
    existing = read_embedded_auth(state_dir)
    if existing is not None:
        return existing
    ensure_state_dir(state_dir)
    auth = EmbeddedAuth(EMBEDDED_USER, secrets.token_urlsafe(32))
    path = embedded_auth_path(state_dir)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"user": auth.user, "password": auth.password}, fh)
    os.replace(tmp, path)
    return auth


def read_embedded_auth(state_dir: Path) -> EmbeddedAuth | None:
    path = embedded_auth_path(state_dir)
    try:
        data = json.loads(path.read_text())
        return EmbeddedAuth(str(data["user"]), str(data["password"]))
    except FileNotFoundError:
        return None
    except PermissionError:
        raise NatsAuthError(
            f"cannot read the embedded NATS credentials {path}: permission denied "
            "(run as the daemon's user, or set nats.url and credentials)"
        ) from None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise NatsAuthError(f"the embedded NATS credentials {path} are unreadable: {exc}") from None


def with_embedded_auth(cfg: NatsSettings, auth: EmbeddedAuth | None) -> NatsSettings:
    """``cfg`` with the embedded server's user and password filled in."""
    if auth is None or not cfg.embedded:
        return cfg
    return cfg.model_copy(update={"user": auth.user, "password": SecretStr(auth.password)})


# ---- connect options --------------------------------------------------------------------


def tls_context(cfg: NatsSettings) -> ssl.SSLContext | None:
    if not (cfg.tls_ca_file or cfg.tls_cert_file):
        return None
    ctx = ssl.create_default_context(cafile=str(cfg.tls_ca_file) if cfg.tls_ca_file else None)
    if cfg.tls_cert_file:
        ctx.load_cert_chain(str(cfg.tls_cert_file), str(cfg.tls_key_file) if cfg.tls_key_file else None)
    return ctx


def connect_kwargs(cfg: NatsSettings) -> dict[str, Any]:
    """Keyword arguments for ``nats.connect`` (user/password, token, creds file, TLS)."""
    kwargs: dict[str, Any] = {}
    if cfg.user:
        kwargs["user"] = cfg.user
        kwargs["password"] = cfg.password.get_secret_value() if cfg.password else ""
    if cfg.token:
        kwargs["token"] = cfg.token.get_secret_value()
    if cfg.creds_file:
        kwargs["user_credentials"] = str(cfg.creds_file)
    ctx = tls_context(cfg)
    if ctx is not None:
        kwargs["tls"] = ctx
    return kwargs


def broker_security(cfg: NatsSettings) -> Any:
    """The FastStream ``security=`` object for the same options (None when none apply)."""
    from faststream.nats.security import NatsCredentials, NatsSecurity, NatsToken, NatsUserPassword

    ctx = tls_context(cfg)
    if cfg.user:
        password = cfg.password.get_secret_value() if cfg.password else ""
        return NatsUserPassword(username=cfg.user, password=password, ssl_context=ctx)
    if cfg.token:
        return NatsToken(token=cfg.token.get_secret_value(), ssl_context=ctx)
    if cfg.creds_file:
        return NatsCredentials(credentials=str(cfg.creds_file), ssl_context=ctx)
    if ctx is not None:
        return NatsSecurity(ssl_context=ctx)
    return None


# ---- the daemon: reconnect for ever, say so on every state change -----------------------

RECONNECT_BASE_S = 0.25
RECONNECT_MAX_S = 5.0


def reconnect_delay(failures: int, *, jitter: float = 0.0) -> float:
    """Seconds to wait before the next reconnect attempt after ``failures`` failed ones:
    0 for the first, then doubling from 0.25 s up to 5 s; ``jitter`` in [-1, 1] moves it
    by up to 20%."""
    if failures <= 0:
        return 0.0
    delay: float = min(RECONNECT_MAX_S, RECONNECT_BASE_S * 2.0 ** (failures - 1))
    return delay * (1 + 0.2 * max(-1.0, min(1.0, jitter)))


def _pick_server(pool: list[Any], _info: dict[str, Any]) -> tuple[Any, float]:
    """nats-py ``reconnect_to_server_handler``: the least-failed server, after a backoff."""
    server = min(pool, key=lambda s: s.reconnects)
    return server, reconnect_delay(server.reconnects, jitter=random.uniform(-1, 1))  # noqa: S311


class ConnectionMonitor:
    """The daemon's view of its NATS connection, fed by nats-py's callbacks: logs one line
    per state change (connecting, disconnected, reconnected, closed) with the URL's password
    hidden, and calls ``on_closed`` when the connection is gone for good."""

    def __init__(self, url: str, on_closed: Callable[[str], None]) -> None:
        self.url = redact_url(url)
        self.state = "connecting"
        self.stopping = False
        self._on_closed = on_closed
        self._since = time.monotonic()
        self._failures = 0
        self._last_note = 0.0

    @property
    def connected(self) -> bool:
        return self.state == "connected"

    def _set(self, state: str) -> float:
        now = time.monotonic()
        took, self._since, self.state, self._failures = now - self._since, now, state, 0
        return took

    def connecting(self) -> None:
        log.info("connecting to NATS", extra={"nats": self.url})

    def connected_now(self) -> None:
        took = self._set("connected")
        log.info("connected to NATS", extra={"nats": self.url, "took_s": round(took, 3)})

    async def error(self, err: Exception) -> None:
        reason = describe(err)
        if self.state == "reconnecting" and unrecoverable(err):
            # FastStream re-raises these from the error callback, which ends nats-py's
            # reconnect task: the connection would stay down for ever.
            self._set("closed")
            log.error("NATS refused to reconnect", extra={"nats": self.url, "reason": reason})
            self._on_closed(f"NATS at {self.url} refused to reconnect: {reason}")
            return
        if self.state in ("connecting", "reconnecting"):
            self._failures += 1
            now = time.monotonic()
            if self._failures == 1 or now - self._last_note >= 30:
                self._last_note = now
                log.warning(
                    "cannot reach NATS, retrying"
                    if self.state == "connecting"
                    else "NATS still unreachable, reconnecting",
                    extra={
                        "nats": self.url,
                        "reason": reason,
                        "attempts": self._failures,
                        "down_s": round(now - self._since, 1),
                    },
                )
            return
        log.warning("NATS error", extra={"nats": self.url, "reason": reason})

    async def disconnected(self) -> None:
        if self.stopping or self.state != "connected":
            return
        self._set("reconnecting")
        log.warning("NATS disconnected, reconnecting", extra={"nats": self.url})

    async def reconnected(self) -> None:
        took = self._set("connected")
        log.info("NATS reconnected", extra={"nats": self.url, "down_s": round(took, 1)})

    async def closed(self) -> None:
        previous = self.state
        self._set("closed")
        if self.stopping:
            return
        log.error("NATS connection closed for good", extra={"nats": self.url, "was": previous})
        self._on_closed("the NATS connection was closed and will not reconnect")

    def broker_kwargs(self) -> dict[str, Any]:
        """What NatsBroker (and so nats.connect) gets: reconnect for ever with backoff,
        and the callbacks above."""
        cbs: dict[str, Callable[..., Awaitable[None]]] = {
            "error_cb": self.error,
            "disconnected_cb": self.disconnected,
            "reconnected_cb": self.reconnected,
            "closed_cb": self.closed,
        }
        return {
            "allow_reconnect": True,
            "max_reconnect_attempts": -1,
            "reconnect_time_wait": 2,  # the initial connect's pace (the handler is not used there)
            "connect_timeout": 2,
            "reconnect_to_server_handler": _pick_server,
            **cbs,
        }


def unrecoverable(err: BaseException) -> bool:
    """An error nats-py will not get past by retrying (authorization, TLS required...)."""
    from faststream.nats.broker.broker import UNRECOVERABLE_CONNECT_ERRORS
    from nats.errors import Error

    reason = str(err).removeprefix("nats: ").strip("'").lower()
    return isinstance(err, Error) and reason in UNRECOVERABLE_CONNECT_ERRORS


def describe(err: BaseException) -> str:
    """A short reason, e.g. ``ConnectionRefusedError: [Errno 111] Connect call failed``."""
    text = str(err).strip()
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


# ---- the command line: one try, a few seconds, one line ---------------------------------


class NatsUnreachableError(Exception):
    """The command line could not reach NATS; the message is the one line to print."""


def cli_url(settings: Settings) -> str:
    return settings.nats.url or f"nats://127.0.0.1:{settings.nats.embedded_port}"


def cli_nats_settings(settings: Settings) -> NatsSettings:
    """The options a command uses: with ``nats.url`` unset, the embedded server's
    credentials from the state dir (when it has them)."""
    if not settings.nats.embedded:
        return settings.nats
    try:
        auth = read_embedded_auth(settings.state_dir)
    except NatsAuthError as exc:
        raise NatsUnreachableError(str(exc)) from None
    return with_embedded_auth(settings.nats, auth)


async def cli_connect(settings: Settings, *, timeout_s: float = 4.0) -> Any:
    """A nats-py client for a command, or :class:`NatsUnreachableError` within ``timeout_s``
    (no retries in the background, no tracebacks)."""
    import nats

    url = cli_url(settings)
    cfg = cli_nats_settings(settings)
    last: list[BaseException] = []

    async def quiet(err: Exception) -> None:
        last.append(err)

    try:
        return await asyncio.wait_for(
            nats.connect(
                servers(url),
                connect_timeout=2,
                allow_reconnect=False,
                # nats-py drops a server from the pool only after max_reconnect_attempts
                # (> 0) failures; 0 would retry for ever
                max_reconnect_attempts=1,
                reconnect_time_wait=0,
                error_cb=quiet,
                **connect_kwargs(cfg),
            ),
            timeout_s,
        )
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        cause = next((e for e in reversed(last) if not _is_no_servers(e)), exc)
        reason = "timed out" if isinstance(cause, TimeoutError) else describe(cause)
        hint = " (is the daemon running?)" if settings.nats.embedded else ""
        raise NatsUnreachableError(f"cannot reach NATS at {redact_url(url)}: {reason}{hint}") from None


def _is_no_servers(err: BaseException) -> bool:
    from nats.errors import NoServersError

    return isinstance(err, NoServersError)
