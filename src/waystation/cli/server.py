"""`waystation server run`: the server process; `server config`: the settings it would use."""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.text import Text

from waystation.cli.output import configure_logging, err, print_table
from waystation.cli.server_config import ConfigError, Setting, resolve, shown
from waystation.core.roles import Actor
from waystation.core.settings import DEFAULT_LISTEN, ServerSettings, default_data_dir, is_loopback
from waystation.core.timeouts import Timeouts, now_us
from waystation.durations import DurationError, parse_go_duration
from waystation.logs import LOG_FORMATS

app = typer.Typer(help="Run the waystation server.", no_args_is_help=True)


@app.command()
def run(
    ctx: typer.Context,
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
    db_wait: Annotated[
        str,
        typer.Option(
            "--db-wait",
            envvar="WAYSTATION_DB_WAIT",
            help="Keep retrying a PostgreSQL that refuses connections at start this long"
            " (a duration, or seconds; 0: do not wait).",
        ),
    ] = "60s",
    audit_retention: Annotated[
        str,
        typer.Option(
            "--audit-retention",
            envvar="WAYSTATION_AUDIT_RETENTION",
            help="Keep audit log entries this long (a duration, or seconds).",
        ),
    ] = "2160h",
    token_ttl: Annotated[
        str,
        typer.Option(
            "--token-ttl",
            envvar="WAYSTATION_TOKEN_TTL",
            help="How long login tokens are valid unless minted with --ttl (0: until revoked).",
        ),
    ] = "720h",
    fsync: Annotated[
        bool, typer.Option("--fsync/--no-fsync", help="Sync every commit to disk before answering.")
    ] = True,
    log_level: Annotated[
        str, typer.Option("--log-level", help="debug, info, warning or error.")
    ] = "info",
    log_format: Annotated[
        str,
        typer.Option(
            "--log-format",
            envvar="WAYSTATION_LOG_FORMAT",
            help="text (for people) or json (one object a line, for log collectors).",
        ),
    ] = "text",
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
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            help="A TOML file of these settings, keys named as the flags (data-dir = ...);"
            " flags and environment variables override it.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Serve the Vagrant and provisionerd protocols until SIGINT or SIGTERM."""
    configured = _configure(ctx, config)
    settings = configured.settings
    configure_logging(configured.log_level, settings.log_format)
    if settings.timeouts.provisioner_hang < 15:
        hang = configured.entries["hang_timeout"]
        logging.getLogger("waystation").warning(
            "the hang timeout %s (%s) is under three daemon heartbeats (5s each):"
            " healthy provisioner jobs may be failed as hung",
            hang.value,
            hang.where,
        )
    from waystation.server.app import serve  # the CLI's other commands need no server code

    try:
        asyncio.run(serve(settings))
    except OSError as exc:  # cannot listen, or no database (store.connect): one line
        logging.getLogger("waystation").error("%s", exc)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:  # before serving, e.g. while waiting for the database
        raise typer.Exit(130) from None


def _with_run_options(command: Callable[..., None]) -> Callable[..., None]:
    """`command` takes every option of `server run` as well as its own (into its
    **options): one list of settings, so that `server config` shows them all."""
    own = [
        p
        for p in inspect.signature(command, eval_str=True).parameters.values()
        if p.kind is not p.VAR_KEYWORD
    ]
    names = {p.name for p in own}
    theirs = [p for p in inspect.signature(run, eval_str=True).parameters.values()]
    signature = inspect.Signature([*own, *(p for p in theirs if p.name not in names)])
    command.__signature__ = signature  # type: ignore[attr-defined]  # what Typer reads
    return command


@app.command("config")
@_with_run_options
def show_config(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    **options: Any,
) -> None:
    """Print the settings `server run` would use with the same flags, each with where
    it came from (flag, environment, file or default); nothing starts."""
    configured = _configure(ctx, options.get("config"))
    settings = configured.settings
    effective = {"data_dir": settings.data_dir, "db": _redact(settings.database_url)}
    config_file = options.get("config")
    listed: dict[str, dict[str, Any]] = {}
    rows = []
    for entry in configured.entries.values():
        value = shown(effective.get(entry.name, entry.value))
        # Which variable, or which file: the flag's name needs no saying.
        origin = {"environment": entry.envvar, "file": str(config_file)}.get(entry.source)
        listed[entry.key] = {"value": value, "source": entry.source}
        if origin:
            listed[entry.key]["from"] = origin
        text = value if isinstance(value, str) else "-" if value is None else json.dumps(value)
        rows.append([entry.key, text, f"{entry.source} {origin}" if origin else entry.source])
    if json_output:
        document = {"config_file": str(config_file) if config_file else None, "settings": listed}
        typer.echo(json.dumps(document, indent=2))
        return
    print_table(["SETTING", "VALUE", "SOURCE"], rows, "no settings")


@dataclass
class Configured:
    settings: ServerSettings
    log_level: str
    entries: dict[str, Setting]  # by parameter name


def _configure(ctx: typer.Context, config: Path | None) -> Configured:
    """The settings from flags, environment, the config file and defaults; a
    setting that cannot be used is one line naming it, and exit 2."""
    try:
        entries = resolve(ctx, config)
        return Configured(_settings(entries), str(entries["log_level"].value), entries)
    except ConfigError as exc:
        err.print(Text.assemble(("error:", "red"), " ", str(exc)))
        raise typer.Exit(2) from None


def _settings(entries: dict[str, Setting]) -> ServerSettings:
    from waystation.store.connect import UnsupportedDatabase, check_url

    def value(name: str) -> Any:
        return entries[name].value

    level = getattr(logging, str(value("log_level")).upper(), None)
    if not isinstance(level, int):
        _bad(entries["log_level"], f"unknown log level {value('log_level')!r}")
    if value("log_format") not in LOG_FORMATS:
        _bad(
            entries["log_format"], f"unknown log format {value('log_format')!r}: want text or json"
        )
    _check_listen(entries)
    _check_tls(entries)
    db_url = value("db") or None
    if db_url:
        try:
            check_url(db_url)
        except UnsupportedDatabase as exc:
            _bad(entries["db"], str(exc))
    return ServerSettings(
        listen=value("listen"),
        data_dir=value("data_dir") or default_data_dir(),
        db_url=db_url,
        fsync=value("fsync"),
        timeouts=Timeouts(
            ack=_seconds(entries["ack_timeout"]),
            heartbeat=_seconds(entries["heartbeat_timeout"]),
            poll=_seconds(entries["poll_interval"]),
            provisioner_hang=_seconds(entries["hang_timeout"]),
        ),
        auth=not value("dev"),
        tls_cert=value("tls_cert"),
        tls_key=value("tls_key"),
        metrics_listen=value("metrics_listen") or None,
        db_wait=_seconds(entries["db_wait"], allow_zero=True),
        audit_retention=_seconds(entries["audit_retention"]),
        token_ttl=_seconds(entries["token_ttl"], allow_zero=True),
        log_format=value("log_format"),
    )


def _check_listen(entries: dict[str, Setting]) -> None:
    host = str(entries["listen"].value).rsplit(":", 1)[0]
    if entries["dev"].value and not is_loopback(host):
        _bad(
            entries["listen"],
            f"--dev turns authentication off, so it listens on loopback only, not {host}",
        )


def _check_tls(entries: dict[str, Setting]) -> None:
    cert, key = entries["tls_cert"], entries["tls_key"]
    if (cert.value is None) != (key.value is None):
        _bad(cert if cert.value is None else key, "give both --tls-cert and --tls-key")
    for entry in (cert, key):
        if entry.value is not None and not Path(entry.value).is_file():
            _bad(entry, f"{entry.value} is not a readable file")


def _bad(entry: Setting, message: str) -> NoReturn:
    raise ConfigError(f"{entry.where}: {message}")


def _seconds(entry: Setting, allow_zero: bool = False) -> float:
    """A duration setting in seconds: a Go duration ("90s", "1h5m") or a number."""
    given = entry.value
    try:
        if isinstance(given, int | float) and not isinstance(given, bool):
            seconds = float(given)
        else:
            text = str(given).strip()
            try:
                seconds = float(text)
            except ValueError:
                seconds = parse_go_duration(text).total_seconds()
    except DurationError as exc:
        _bad(entry, str(exc))
    if not math.isfinite(seconds) or seconds < 0 or (seconds == 0 and not allow_zero):
        _bad(entry, "must be zero or more seconds" if allow_zero else "must be positive")
    return seconds


def _redact(url: str) -> str:
    from waystation.store.connect import redact

    return redact(url)


# -- signing keys, straight on the database (no server needed) ------------------------

keys_app = typer.Typer(help="Token signing keys.", no_args_is_help=True)
app.add_typer(keys_app, name="keys")

T = TypeVar("T")

DataDir = Annotated[
    Path | None, typer.Option("--data-dir", envvar="WAYSTATION_DATA_DIR", show_default=False)
]
Db = Annotated[str, typer.Option("--db", envvar="WAYSTATION_DB", show_default=False)]


def _store_write(data_dir: Path | None, db: str, verb: Callable[[Any], T]) -> T:
    """Run one blocking store verb on the database `server run` would use."""
    import sqlalchemy as sa

    from waystation.store import Store
    from waystation.store.connect import UnsupportedDatabase, check_url, reason, redact

    settings = ServerSettings(data_dir=data_dir or default_data_dir(), db_url=db or None)
    url = settings.database_url
    try:
        check_url(url)
        store = Store.open(url)
    except UnsupportedDatabase as exc:  # as `server run`: one line, not a traceback
        err.print(Text.assemble(("error:", "red"), " ", str(exc)))
        raise typer.Exit(2) from None
    except sa.exc.OperationalError as exc:  # no waiting here: a person is at the keyboard
        message = f"cannot connect to the database at {redact(url)}: {reason(exc)}"
        err.print(Text.assemble(("error:", "red"), " ", message))
        raise typer.Exit(1) from None
    try:
        return verb(store)
    finally:
        asyncio.run(store.close())


def _local_actor() -> Actor:
    """Who runs `server keys` in the audit log: `local:<OS user>` (no token, no peer)."""
    import getpass

    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no name for this uid (a bare container)
        user = str(os.getuid())
    return Actor(f"local:{user}")


@keys_app.command("rotate")
def keys_rotate(data_dir: DataDir = None, db: Db = "") -> None:
    """Add a signing key; tokens signed by older keys keep working until retired."""
    actor = _local_actor()
    key_id = _store_write(data_dir, db, lambda store: store.key_rotate_now(now_us(), actor))
    typer.echo(f"new signing key {key_id}")


@keys_app.command("retire")
def keys_retire(key_id: str, data_dir: DataDir = None, db: Db = "") -> None:
    """Retire a key: tokens it signed stop working (within seconds on every server)."""
    from waystation.errors import WaystationError

    try:
        actor = _local_actor()
        _store_write(data_dir, db, lambda store: store.key_retire_now(key_id, now_us(), actor))
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

    found = _store_write(data_dir, db, lambda store: store.keys_list_now())
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
