"""Secrets in connection URLs, pure: ``nats://user:pass@host`` is shown as
``nats://user:***@host``, and the password goes to the Redactor."""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote, urlsplit


def servers(url: str) -> list[str]:
    """``nats.url`` may list a cluster, comma-separated."""
    return [part.strip() for part in url.split(",") if part.strip()]


def _split(server: str) -> Any:
    return urlsplit(server if "://" in server else f"//{server}")


def redact_url(url: str) -> str:
    """``url`` (one or a comma-separated list) with the userinfo hidden: ``user:pass@``
    becomes ``user:***@``, a lone ``token@`` becomes ``***@``."""
    out = []
    for server in servers(url) or [url]:
        parts = _split(server)
        netloc = parts.netloc
        if "@" not in netloc:
            out.append(server)
            continue
        userinfo, _, host = netloc.rpartition("@")
        user, colon, _password = userinfo.partition(":")
        masked = f"{user}:***" if colon else "***"
        out.append(server.replace(netloc, f"{masked}@{host}", 1))
    return ",".join(out)


def url_secrets(url: str | None) -> list[str]:
    """The passwords and tokens written inside ``url`` (as written and decoded), for the
    Redactor."""
    found: list[str] = []
    for server in servers(url or ""):
        parts = _split(server)
        if "@" not in parts.netloc:
            continue
        userinfo = parts.netloc.rpartition("@")[0]
        user, colon, password = userinfo.partition(":")
        secret = password if colon else user
        if secret:
            found.extend({secret, unquote(secret)})
    return found
