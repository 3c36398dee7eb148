"""``enrichd`` command line (CONTRACT §8). Parses arguments, builds Settings once and
hands over; nothing runs at import time."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from service.settings import ConfigError, Settings, load_settings

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Enrich streams of items with an LLM.")

ConfigOpt = Annotated[Path | None, typer.Option("--config", "-c", help="TOML config file")]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(f"enrichd: {exc}", err=True)
        raise typer.Exit(2) from None


@app.command()
def run(config: ConfigOpt = None) -> None:
    """Run the daemon in the foreground (systemd runs this)."""
    from service.app import Daemon
    from service.observability import logs

    settings = _settings(config)
    logs.configure(
        level=settings.telemetry.log_level, fmt=settings.telemetry.log_format, secrets=settings.secrets()
    )
    try:
        asyncio.run(Daemon(settings).run())
    except KeyboardInterrupt:
        pass
    except Exception as exc:  # noqa: BLE001 - one clear line, not a traceback, for start-up failures
        from service.core.redact import Redactor

        typer.echo(Redactor(settings.secrets())(f"enrichd: {type(exc).__name__}: {exc}"), err=True)
        raise typer.Exit(1) from None


@app.command()
def submit(
    handler: Annotated[str, typer.Argument(help="handler name, e.g. summarize")],
    paths: Annotated[list[Path], typer.Argument(help="files: one item per file, per line for .jsonl")],
    priority: Annotated[str | None, typer.Option(help="urgent | high | normal | low")] = None,
    wait: Annotated[bool, typer.Option("--wait", help="wait for every result, with a progress bar")] = False,
    timeout_s: Annotated[float, typer.Option("--timeout", help="seconds to wait with --wait")] = 600.0,
    config: ConfigOpt = None,
) -> None:
    """Publish items to enrich.in.HANDLER."""
    from service.cli.submit import SubmitError, run_submit

    settings = _settings(config)
    if priority is not None and priority not in ("urgent", "high", "normal", "low"):
        typer.echo("enrichd: --priority must be urgent, high, normal or low", err=True)
        raise typer.Exit(2)
    try:
        code = asyncio.run(
            run_submit(settings, handler, paths, priority=priority, wait=wait, timeout_s=timeout_s)
        )
    except SubmitError as exc:
        typer.echo(f"enrichd: {exc}", err=True)
        raise typer.Exit(2) from None
    raise typer.Exit(code)


@app.command()
def status(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Buffers, batches in flight with progress and ETA, DLQ depth."""
    from service.cli.status import collect, render

    data = _admin(collect(_settings(config)))
    if as_json:
        print_json(data)
        return
    _console().print(render(data))


@app.command()
def versions(
    config: ConfigOpt = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="only the configuration: do not read NATS")
    ] = False,
    limit: Annotated[int, typer.Option(min=1, help="stored answers read at most, per handler")] = 10_000,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Each handler's model, handler_version and pack, and the versions of its answers in
    the result store (the current one marked)."""
    from service.cli.versions import collect as collect_versions
    from service.cli.versions import table

    data = asyncio.run(collect_versions(_settings(config), offline=offline, limit=limit))
    if as_json:
        print_json(data)
        return
    _console().print(table(data))
    if data["store"]["read"] or offline:
        typer.echo(data["store"]["note"])
    else:
        typer.echo(f"enrichd: {data['store']['note']}", err=True)


@app.command()
def estimate(
    handler: Annotated[str, typer.Argument(help="handler name")],
    paths: Annotated[list[Path], typer.Argument(help="files, read as by submit")],
    priority: Annotated[
        str | None, typer.Option(help="urgent | high | normal | low, as submit would send them")
    ] = None,
    offline: Annotated[
        bool, typer.Option("--offline", help="do not read the observed tokens from NATS")
    ] = False,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Tokens, route mix and cost, without calling the provider. Output tokens are the
    handler's observed average per item (daily stats, read over NATS) when it has one,
    else its max_output_tokens: an upper bound."""
    from service.cli.estimate import estimate as run_estimate
    from service.cli.estimate import read_observed, render
    from service.cli.submit import SubmitError

    settings = _settings(config)
    if priority is not None and priority not in ("urgent", "high", "normal", "low"):
        typer.echo("enrichd: --priority must be urgent, high, normal or low", err=True)
        raise typer.Exit(2)
    if handler not in settings.registry:
        typer.echo(
            f"enrichd: no handler named {handler!r} (configured: {', '.join(sorted(settings.registry))})",
            err=True,
        )
        raise typer.Exit(2)
    observed, note = (None, "not read (--offline)") if offline else asyncio.run(read_observed(settings))
    try:
        result = run_estimate(settings, handler, paths, priority=priority, observed=observed, stats_note=note)
    except (SubmitError, ValueError) as exc:
        typer.echo(f"enrichd: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        print_json(result.to_dict())
        return
    for line in render(result):
        typer.echo(line)


@app.command()
def check(config: ConfigOpt = None) -> None:
    """Validate the configuration and reach NATS and the provider."""
    from service.cli.check import run_check

    settings = _settings(config)
    ok = asyncio.run(run_check(settings, lambda line: typer.echo(line)))
    raise typer.Exit(0 if ok else 1)


@app.command()
def emulator(
    port: Annotated[int, typer.Option(help="port to listen on")] = 8089,
    host: Annotated[str, typer.Option(help="address to bind")] = "127.0.0.1",
    batch_delay_s: Annotated[float, typer.Option(help="seconds a batch takes to complete")] = 5.0,
) -> None:
    """Run the built-in OpenAI-compatible emulator."""
    import logging

    from service.emulator import EmulatorConfig, run_forever

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        asyncio.run(run_forever(host, port, EmulatorConfig(batch_delay_s=batch_delay_s)))
    except KeyboardInterrupt:
        pass


batches_app = typer.Typer(no_args_is_help=True, help="Provider batches the daemon owns.")
dlq_app = typer.Typer(no_args_is_help=True, help="Dead letters.")
app.add_typer(batches_app, name="batches")
app.add_typer(dlq_app, name="dlq")


def _admin(coro: Any) -> Any:
    from service.cli.admin import AdminError

    try:
        return asyncio.run(coro)
    except AdminError as exc:
        typer.echo(f"enrichd: {exc}", err=True)
        raise typer.Exit(1) from None


@batches_app.command("list")
def batches_list(
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Batches with their status and request counts, oldest first."""
    from service.cli.admin import list_batches
    from service.cli.views import batches_table

    records = _admin(list_batches(_settings(config)))
    if as_json:
        print_json([r.__dict__ for r in records])
        return
    _console().print(batches_table(records))


@batches_app.command("show")
def batches_show(
    ident: Annotated[str, typer.Argument(help="batch id or flush id")], config: ConfigOpt = None
) -> None:
    """Everything recorded about one batch."""
    from service.cli.admin import show_batch

    record = _admin(show_batch(_settings(config), ident))
    print_json(record.__dict__)


@batches_app.command("cancel")
def batches_cancel(
    batch_id: Annotated[str, typer.Argument(help="provider batch id")], config: ConfigOpt = None
) -> None:
    """Cancel a batch; its unfinished items end as errors with code batch_cancelled."""
    from service.cli.admin import cancel_batch

    answer = _admin(cancel_batch(_settings(config), batch_id))
    typer.echo(f"{answer['batch_id']}: {answer['status']}")


@dlq_app.command("list")
def dlq_list(
    handler: Annotated[str | None, typer.Option(help="only this handler")] = None,
    config: ConfigOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable output")] = False,
) -> None:
    """Dead letters, oldest first."""
    from service.cli.admin import dlq_entries
    from service.cli.views import dlq_table

    entries = _admin(dlq_entries(_settings(config), handler=handler))
    if as_json:
        print_json(entries)
        return
    _console().print(dlq_table(entries))


@dlq_app.command("replay")
def dlq_replay(
    handler: Annotated[str | None, typer.Option(help="only this handler")] = None,
    code: Annotated[list[str] | None, typer.Option(help="only this error code (repeatable)")] = None,
    retryable_only: Annotated[
        bool, typer.Option("--retryable-only", help="only transient errors (rate limit, 5xx, timeout...)")
    ] = False,
    config: ConfigOpt = None,
) -> None:
    """Send dead letters through intake again (and remove them from the DLQ)."""
    from service.cli.admin import replay_dlq

    replayed, skipped = _admin(
        replay_dlq(
            _settings(config),
            handler=handler,
            codes=set(code) if code else None,
            retryable_only=retryable_only,
        )
    )
    typer.echo(f"replayed {replayed} item(s); {skipped} left in the DLQ (no parsable item, or filtered out)")


def _console() -> Any:
    from rich.console import Console

    # Piped output (scripts, logs) gets wide lines instead of rich's 80-column default.
    return Console() if sys.stdout.isatty() else Console(width=200)


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, ensure_ascii=False) + "\n")


def main() -> None:
    app()


if __name__ == "__main__":
    main()
