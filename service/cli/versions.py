"""``enrichd versions``: each configured handler with its model, ``handler_version``
(CONTRACT §13) and ``pack``, and, when NATS can be reached, which handler versions the
result store's answers carry and how many each. The configured part needs nothing but
the configuration.

Reading the store is bounded: per handler, one ephemeral consumer delivers the last
value of each key (``$KV.<bucket>.<handler>.>``, the number of keys comes from its
pending count) and at most ``limit`` of them are read; when a handler has more, the
counts are those of the first ``limit`` keys (oldest answers first) and the output says so."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError
from rich.table import Table

from service.cli.admin import AdminError, connect
from service.contract.subjects import Subjects
from service.core import fastjson
from service.settings import Settings

DEFAULT_LIMIT = 10_000
FETCH = 256
NO_VERSION = "(none)"  # answers stored before handler versions existed


@dataclass
class Stored:
    keys: int  # keys of this handler in the store (deleted ones not yet purged included)
    read: int = 0
    versions: dict[str, int] = field(default_factory=dict)

    @property
    def sampled(self) -> bool:
        return self.read < self.keys


def configured(settings: Settings) -> list[dict[str, Any]]:
    return [
        {
            "handler": name,
            "model": spec.model,
            "endpoint": spec.endpoint,
            "handler_version": spec.version,
            "pack": spec.pack,
            "flex": spec.flex,
            "stored": None,
        }
        for name, spec in sorted(settings.registry.items())
    ]


async def scan_store(js: Any, bucket: str, handler: str, *, limit: int) -> Stored:
    """Count the handler versions of (at most ``limit`` of) a handler's stored answers."""
    try:
        sub = await js.pull_subscribe(
            f"$KV.{bucket}.{handler}.>",
            stream=f"KV_{bucket}",
            config=ConsumerConfig(
                deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                ack_policy=AckPolicy.NONE,
                inactive_threshold=30,
            ),
        )
    except NotFoundError:  # no daemon has stored anything yet
        return Stored(keys=0)
    try:
        info = await sub.consumer_info()
        stored = Stored(keys=int(info.num_pending))
        want = min(limit, stored.keys)
        while stored.read < want:
            try:
                msgs = await sub.fetch(min(FETCH, want - stored.read), timeout=2.0)
            except Exception:  # noqa: BLE001 - nothing more (expired meanwhile)
                break
            for msg in msgs:
                stored.read += 1
                if (msg.headers or {}).get("KV-Operation") in ("DEL", "PURGE") or not msg.data:
                    continue
                try:
                    version = fastjson.loads(msg.data)["event"].get("handler_version") or NO_VERSION
                except Exception:  # noqa: BLE001 - not a result record
                    continue
                stored.versions[version] = stored.versions.get(version, 0) + 1
        return stored
    finally:
        try:
            await sub.unsubscribe()
        except Exception:  # noqa: BLE001, S110 - the consumer goes away on its own
            pass


async def collect(settings: Settings, *, offline: bool, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    rows = configured(settings)
    store: dict[str, Any] = {"read": False, "limit": limit, "note": "result store: not read (--offline)"}
    if not offline:
        bucket = Subjects(settings.nats.subject_prefix).results_bucket
        try:
            async with connect(settings) as nc:
                js = nc.jetstream()
                for row in rows:
                    found = await scan_store(js, bucket, row["handler"], limit=limit)
                    row["stored"] = {"keys": found.keys, "read": found.read, "versions": found.versions}
        except AdminError as exc:
            for row in rows:
                row["stored"] = None
            store["note"] = f"result store not read: {exc}"
        else:
            keys = sum(r["stored"]["keys"] for r in rows)
            read = sum(r["stored"]["read"] for r in rows)
            sampled = any(r["stored"]["read"] < r["stored"]["keys"] for r in rows)
            store = {
                "read": True,
                "limit": limit,
                "note": f"result store: read {read:,} of {keys:,} stored answers"
                + (f" (at most {limit:,} per handler: counts are of those read)" if sampled else ""),
            }
    return {"handlers": rows, "store": store}


def table(data: dict[str, Any]) -> Table:
    read = data["store"]["read"]
    out = Table(title="handler versions")
    columns = ["handler", "model", "version", "pack"] + (["stored answers by version"] if read else [])
    for column in columns:
        out.add_column(column, no_wrap=column != "stored answers by version")
    for row in data["handlers"]:
        cells = [row["handler"], row["model"], row["handler_version"], str(row["pack"])]
        if read:
            current = row["handler_version"]
            counts = {current: 0, **row["stored"]["versions"]}
            versions = sorted(counts.items(), key=lambda kv: (kv[0] != row["handler_version"], -kv[1]))
            cells.append(
                ", ".join(
                    f"{v} (current): {n:,}" if v == row["handler_version"] else f"{v}: {n:,}"
                    for v, n in versions
                )
                or "-"
            )
        out.add_row(*cells)
    return out
