"""`waystation server run`: the server process."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from waystation.config import DEFAULT_LISTEN, ServerSettings, default_data_dir
from waystation.durations import DurationError, parse_go_duration
from waystation.engine.rules import Timeouts

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
) -> None:
    """Serve the Vagrant and provisionerd protocols until SIGINT or SIGTERM."""
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", force=True
    )
    timeouts = Timeouts(
        ack=_seconds(ack_timeout, "--ack-timeout"),
        heartbeat=_seconds(heartbeat_timeout, "--heartbeat-timeout"),
        poll=_seconds(poll_interval, "--poll-interval"),
    )
    settings = ServerSettings(
        listen=listen,
        data_dir=data_dir or default_data_dir(),
        db_url=db or None,
        fsync=fsync,
        timeouts=timeouts,
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
