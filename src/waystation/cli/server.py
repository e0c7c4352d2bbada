"""`waystation server run`: the server process."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Annotated

import typer

from waystation.config import DEFAULT_LISTEN, ServerSettings, default_data_dir

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
) -> None:
    """Serve the Vagrant and provisionerd protocols until SIGINT or SIGTERM."""
    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        raise typer.BadParameter(f"unknown log level {log_level!r}", param_hint="--log-level")
    logging.basicConfig(
        level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", force=True
    )
    settings = ServerSettings(
        listen=listen, data_dir=data_dir or default_data_dir(), db_url=db or None, fsync=fsync
    )
    from waystation.server.app import serve  # the CLI's other commands need no server code

    try:
        asyncio.run(serve(settings))
    except OSError as exc:
        logging.getLogger("waystation").error("%s", exc)
        raise typer.Exit(1) from None
