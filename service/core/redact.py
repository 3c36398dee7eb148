"""Secrets, pure: the Redactor that scrubs every known secret from what the daemon writes
(logs, events, errors), and URLs shown without their password (``nats://user:***@host``)."""

from __future__ import annotations

from collections.abc import Iterable
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


class Redactor:
    """Replaces every known secret value with ``***`` (API keys, NATS passwords)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for secret in self._secrets:
            if secret in text:
                text = text.replace(secret, "***")
        return text
