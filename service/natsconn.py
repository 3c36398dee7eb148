"""Connection options for NATS from settings, for both FastStream and raw nats-py."""

from __future__ import annotations

import ssl
from typing import Any

from service.settings import NatsSettings


def servers(url: str) -> list[str]:
    """``nats.url`` may list a cluster, comma-separated."""
    return [part.strip() for part in url.split(",") if part.strip()]


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
