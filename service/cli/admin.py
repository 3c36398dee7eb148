"""Operator commands that read or act on the durable state over NATS: ``batches``,
``dlq`` and ``status``. They need only NATS, not the provider: cancelling a batch is
asked of the daemon that owns it (request/reply on ``<prefix>._control.cancel``)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from service.broker.connect import NatsUnreachableError, cli_connect, cli_url, describe
from service.contract.subjects import Subjects
from service.core.redact import redact_url
from service.settings import Settings
from service.state.batches import BatchRecord, BatchStore


class AdminError(Exception):
    """A command could not do what was asked; the message says why."""


@asynccontextmanager
async def connect(settings: Settings) -> AsyncIterator[Client]:
    """A NATS client for one command; AdminError (one line, the URL without its password)
    when NATS cannot be reached within a few seconds, or fails while the command runs."""
    try:
        nc = await cli_connect(settings)
    except NatsUnreachableError as exc:
        raise AdminError(str(exc)) from None
    try:
        yield nc
    except (AdminError, KeyboardInterrupt):
        raise
    except Exception as exc:  # noqa: BLE001 - a NATS failure mid-command: one line
        from nats.errors import Error as NatsError

        if not isinstance(exc, NatsError | TimeoutError | OSError):
            raise
        raise AdminError(f"NATS at {redact_url(cli_url(settings))} failed: {describe(exc)}") from None
    finally:
        try:
            await nc.close()
        except Exception:  # noqa: BLE001, S110 - closing a broken connection
            pass


async def list_batches(settings: Settings) -> list[BatchRecord]:
    subjects = Subjects(settings.nats.subject_prefix)
    async with connect(settings) as nc:
        store = await BatchStore.open(
            nc.jetstream(), subjects.stream_suffix, replicas=settings.nats.stream_replicas
        )
        return await store.all()


async def show_batch(settings: Settings, ident: str) -> BatchRecord:
    for record in await list_batches(settings):
        if ident in (record.flush_id, record.batch_id) or ident in record.previous_batch_ids:
            return record
    raise AdminError(f"no batch {ident!r} is known to this deployment")


async def cancel_batch(settings: Settings, batch_id: str) -> dict[str, Any]:
    subjects = Subjects(settings.nats.subject_prefix)
    async with connect(settings) as nc:
        try:
            reply = await nc.request(
                subjects.control("cancel"), json.dumps({"batch_id": batch_id}).encode(), timeout=30
            )
        except Exception as exc:  # noqa: BLE001
            raise AdminError(f"no daemon answered the cancel request: {exc}") from None
    answer: dict[str, Any] = json.loads(reply.data)
    if answer.get("error"):
        raise AdminError(str(answer["error"]))
    return answer


async def dlq_entries(
    settings: Settings, *, handler: str | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    subjects = Subjects(settings.nats.subject_prefix)
    async with connect(settings) as nc:
        js = nc.jetstream()
        stream = subjects.stream("DLQ")
        info = await js.stream_info(stream)
        if not info.state.messages:
            return []
        sub = await js.pull_subscribe(
            subjects.dlq(handler) if handler else subjects.dlq_filter,
            stream=stream,
            config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL, inactive_threshold=30),
        )
        out: list[dict[str, Any]] = []
        try:
            while len(out) < min(limit, info.state.messages):
                try:
                    msgs = await sub.fetch(min(500, limit - len(out)), timeout=1.0)
                except Exception:  # noqa: BLE001 - nothing more to read
                    break
                for m in msgs:
                    entry = json.loads(m.data)
                    entry["_seq"] = m.metadata.sequence.stream
                    out.append(entry)
        finally:
            await sub.unsubscribe()
        return out


def replay_wanted(entry: dict[str, Any], *, codes: set[str] | None, retryable_only: bool) -> bool:
    """Whether ``enrichd dlq replay`` with these filters takes this entry."""
    error = entry.get("error") or {}
    if codes is not None and error.get("code") not in codes:
        return False
    return not retryable_only or bool(error.get("retryable"))


async def replay_dlq(
    settings: Settings,
    *,
    handler: str | None = None,
    codes: set[str] | None = None,
    retryable_only: bool = False,
) -> tuple[int, int]:
    """Send dead letters that can be replayed through intake again, and remove them from
    the DLQ. Returns (replayed, skipped): entries without a parsed item (bad JSON, not
    UTF-8...) cannot be replayed unchanged and stay; so do entries the filters leave out
    (``codes``: only these error codes; ``retryable_only``: only transient errors).

    Each replay carries ``Nats-Msg-Id: dlq-replay:<DLQ seq>``, so a replay interrupted
    between the publish and the delete and then run again does not send the item twice."""
    subjects = Subjects(settings.nats.subject_prefix)
    entries = await dlq_entries(settings, handler=handler, limit=1_000_000)
    replayed = skipped = 0
    async with connect(settings) as nc:
        js = nc.jetstream()
        for entry in entries:
            item = entry.get("item")
            if not isinstance(item, dict) or not replay_wanted(
                entry, codes=codes, retryable_only=retryable_only
            ):
                skipped += 1
                continue
            await js.publish(
                subjects.intake_prefix + entry["handler"],
                json.dumps(item).encode(),
                headers={"Nats-Msg-Id": f"dlq-replay:{entry['_seq']}"},
            )
            await js.delete_msg(subjects.stream("DLQ"), entry["_seq"])
            replayed += 1
    return replayed, skipped
