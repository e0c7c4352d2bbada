"""`waystation server run`: the server process."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated, Any

import typer

from waystation.cli.output import configure_logging
from waystation.config import DEFAULT_LISTEN, ServerSettings, default_data_dir, is_loopback
from waystation.durations import DurationError, parse_go_duration
from waystation.engine.rules import Timeouts, now_us

app = typer.Typer(help="Run the waystation server.", no_args_is_help=True)


@app.command()
def run(
    listen: Annotated[
        str, typer.Option("--listen", envvar="WAYSTATION_LISTEN", help="Address to serve gRPC on.")
    ] = DEFAULT_LISTEN,
    data_dir: Annotated[
        Path | None,
        typer.Option(
            "--data-dir",
            envvar="WAYSTATION_DATA_DIR",
            help="Where the server keeps its files. [default: the user data directory]",
            show_default=False,
        ),
    ] = None,
    db: Annotated[
        str,
        typer.Option(
            "--db",
            envvar="WAYSTATION_DB",
            help="sqlite:///PATH or postgresql://... [default: SQLite in the data dir]",
            show_default=False,
        ),
    ] = "",
    fsync: Annotated[
        bool, typer.Option("--fsync/--no-fsync", help="Sync every commit to disk before answering.")
    ] = True,
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "info",
    ack_timeout: Annotated[
        str, typer.Option("--ack-timeout", help="Requeue a job not acked within this.")
    ] = "2m",
    heartbeat_timeout: Annotated[
        str, typer.Option("--heartbeat-timeout", help="End a running job silent this long.")
    ] = "2m",
    poll_interval: Annotated[
        str,
        typer.Option("--poll-interval", help="How often to look for work other replicas changed."),
    ] = "2s",
    hang_timeout: Annotated[
        str,
        typer.Option(
            "--hang-timeout",
            help="Fail a provisioner job with no update from its daemon this long.",
        ),
    ] = "5m",
    dev: Annotated[
        bool,
        typer.Option("--dev", help="Development mode: no authentication (loopback only)."),
    ] = False,
    tls_cert: Annotated[
        Path | None, typer.Option("--tls-cert", help="PEM certificate chain to serve TLS with.")
    ] = None,
    tls_key: Annotated[
        Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert.")
    ] = None,
    metrics_listen: Annotated[
        str,
        typer.Option(
            "--metrics-listen",
            envvar="WAYSTATION_METRICS_LISTEN",
            help="HOST:PORT to serve Prometheus metrics on (/metrics, plain HTTP, no token)."
            " [default: not served]",
            show_default=False,
        ),
    ] = "",
) -> None:
    """Serve the Vagrant and provisionerd protocols until SIGINT or SIGTERM."""
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    configure_logging(log_level)
    timeouts = Timeouts(
        ack=_seconds(ack_timeout, "--ack-timeout"),
        heartbeat=_seconds(heartbeat_timeout, "--heartbeat-timeout"),
        poll=_seconds(poll_interval, "--poll-interval"),
        provisioner_hang=_seconds(hang_timeout, "--hang-timeout"),
    )
    if timeouts.provisioner_hang < 15:
        logging.getLogger("waystation").warning(
            "--hang-timeout %s is under three daemon heartbeats (5s each):"
            " healthy provisioner jobs may be failed as hung",
            hang_timeout,
        )
    host = listen.rsplit(":", 1)[0]
    if dev and not is_loopback(host):
        raise typer.BadParameter(
            f"--dev turns authentication off, so it listens on loopback only, not {host}",
            param_hint="--listen",
        )
    if (tls_cert is None) != (tls_key is None):
        raise typer.BadParameter("give both --tls-cert and --tls-key", param_hint="--tls-cert")
    for path in (tls_cert, tls_key):
        if path is not None and not path.is_file():
            raise typer.BadParameter(f"{path} is not a readable file", param_hint="--tls-cert")
    settings = ServerSettings(
        listen=listen,
        data_dir=data_dir or default_data_dir(),
        db_url=db or None,
        fsync=fsync,
        timeouts=timeouts,
        auth=not dev,
        tls_cert=tls_cert,
        tls_key=tls_key,
        metrics_listen=metrics_listen or None,
    )
    from waystation.server.app import serve  # the CLI's other commands need no server code

    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        logging.getLogger("waystation").error("%s", exc)
        raise typer.Exit(1) from None


def _seconds(text: str, flag: str) -> float:
    try:
        seconds = parse_go_duration(text).total_seconds()
    except DurationError as exc:
        raise typer.BadParameter(str(exc), param_hint=flag) from None
    if seconds <= 0:
        raise typer.BadParameter("must be positive", param_hint=flag)
    return seconds


# -- signing keys, straight on the database (no server needed) ------------------------

keys_app = typer.Typer(help="Token signing keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", envvar="WAYSTATION_DATA_DIR", show_default=False)
]
Db = Annotated[str, typer.Option("--db", envvar="WAYSTATION_DB", show_default=False)]


def _store_write(data_dir: Path | None, db: str, fn: Any, *args: Any) -> Any:
    from waystation.store import Store

    settings = ServerSettings(data_dir=data_dir or default_data_dir(), db_url=db or None)
    store = Store.open(settings.database_url)
    try:
        return store.db.run_sync(lambda conn: fn(conn, *args))
    finally:
        asyncio.run(store.close())


@keys_app.command("rotate")
def keys_rotate(data_dir: DataDir = None, db: Db = "") -> None:
    """Add a signing key; tokens signed by older keys keep working until retired."""
    from waystation.store import auth

    key_id = _store_write(data_dir, db, auth.keys_rotate, now_us())
    typer.echo(f"new signing key {key_id}")


@keys_app.command("retire")
def keys_retire(key_id: str, data_dir: DataDir = None, db: Db = "") -> None:
    """Retire a key: tokens it signed stop working (within seconds on every server)."""
    from waystation.errors import WaystationError
    from waystation.store import auth

    try:
        _store_write(data_dir, db, auth.keys_retire, key_id, now_us())
    except WaystationError as exc:
        typer.echo(f"error: {exc.message}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"retired {key_id}")


@keys_app.command("list")
def keys_list(
    data_dir: DataDir = None,
    db: Db = "",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """List signing keys."""
    from waystation.cli.output import print_data, rfc3339
    from waystation.store import auth

    found = _store_write(data_dir, db, auth.keys_list)
    if as_json:
        return print_data(
            [
                {
                    "id": key_id,
                    "state": "retired" if retired else "active",
                    "created": rfc3339(created),
                    "retired": rfc3339(retired) if retired else None,
                }
                for key_id, created, retired in found
            ]
        )
    for key_id, created, retired in found:
        line = f"{key_id}\t{'retired' if retired else 'active'}\tcreated {rfc3339(created)}"
        typer.echo(f"{line}\tretired {rfc3339(retired)}" if retired else line)
