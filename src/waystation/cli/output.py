"""How the CLI talks to the server and to people: channels, errors, tables, JSON."""

from __future__ import annotations

import datetime
import json
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import grpc
import typer
from google.protobuf.json_format import MessageToDict
from google.protobuf.message import Message
from google.protobuf.timestamp_pb2 import Timestamp
from rich.console import Console
from rich.table import Table
from rich.text import Text

from waystation import logs
from waystation.client import Connection

# Piped output is not cut to 80 columns: scripts and pagers get whole values.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 100_000)
err = Console(stderr=True, highlight=False, soft_wrap=True)

Req = TypeVar("Req", bound=Message)
Resp = TypeVar("Resp")


@dataclass
class Context:
    """What the root command parsed, handed to every subcommand."""

    connection: Connection
    context_name: str = ""
    _channel: grpc.Channel | None = None

    @property
    def address(self) -> str:
        return self.connection.address

    @property
    def channel(self) -> grpc.Channel:
        if self._channel is None:
            self._channel = self.connection.channel()
        return self._channel


def call(
    ctx: Context,
    method: Callable[..., Resp],
    request: Message,
    timeout: float = 30,
    about: str = "",
) -> Resp:
    """Make one RPC; on failure print one clear line (prefixed `about`) and exit 1."""
    with rpc_errors(ctx, about):
        return method(request, timeout=timeout)


@contextmanager
def rpc_errors(ctx: Context, about: str = "") -> Iterator[None]:
    try:
        yield
    except grpc.RpcError as exc:
        code: grpc.StatusCode = exc.code()
        details: str = exc.details() or ""
        if code == grpc.StatusCode.UNAUTHENTICATED:
            fail(f"{details} (log in with `waystation login`, or pass --token)")
        if code == grpc.StatusCode.UNAVAILABLE:
            if not ctx.connection.uses_tls and ctx.connection.speaks_tls(details):
                fail(
                    f"the server at {ctx.address} speaks TLS and this client does not: "
                    "pass --tls (and --tls-ca FILE if a private CA signed its certificate)"
                )
            fail(
                f"cannot reach the waystation server at {ctx.address} ({details}); "
                "start one with `waystation server run` or pass --address"
            )
        elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
            fail(f"the server at {ctx.address} did not answer in time")
        else:
            fail(f"{about}: {details} ({code.name})" if about else f"{details} ({code.name})")


def configure_logging(level: str, log_format: str = "text") -> None:
    """Logging for the long-running commands (server, runner, provisioner daemon):
    `text` lines for people, or `json` (one object a line) for log collectors."""
    handler = logging.StreamHandler()
    handler.setFormatter(logs.formatter(log_format))
    logging.basicConfig(
        level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True
    )
    # Alembic 1.17+ announces each of its plugins at INFO on every start.
    logging.getLogger("alembic.runtime.plugins").setLevel(logging.WARNING)
    migration = logging.getLogger("alembic.runtime.migration")
    if not any(isinstance(f, logs.QuietAlembicStart) for f in migration.filters):
        migration.addFilter(logs.QuietAlembicStart())


def fail(message: str) -> NoReturn:
    err.print(Text.assemble(("error:", "red"), " ", message))
    raise typer.Exit(1)


def to_dict(message: Message) -> dict[str, Any]:
    return MessageToDict(message, preserving_proto_field_name=True)


def print_json(data: Message | Sequence[Message]) -> None:
    """Messages as JSON; their Timestamps come out in RFC 3339, as everywhere in --json."""
    value = [to_dict(m) for m in data] if isinstance(data, Sequence) else to_dict(data)
    print_data(value)


def print_data(value: Any) -> None:
    """Plain data as JSON (times already in RFC 3339: see `rfc3339`)."""
    out.print_json(json.dumps(value), highlight=False)


def rfc3339(value: Timestamp | int) -> str:
    """A Timestamp, or microseconds since the epoch, as RFC 3339 in UTC (`...Z`)."""
    if isinstance(value, Timestamp):
        return value.ToJsonString()
    moment = datetime.datetime.fromtimestamp(value / 1_000_000, datetime.UTC)
    return moment.isoformat().replace("+00:00", "Z")


def print_table(columns: Sequence[str], rows: Sequence[Sequence[str]], empty: str) -> None:
    if not rows:
        err.print(empty)
        return
    table = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column.upper(), overflow="fold")
    for row in rows:
        table.add_row(*(Text(cell) for cell in row))  # values are data, never markup
    out.print(table)


def print_record(message: Message) -> None:
    """A record as `field: value` lines; nested messages as compact JSON."""
    for key, value in to_dict(message).items():
        shown = value if isinstance(value, str) else json.dumps(value)
        out.print(Text.assemble((key, "bold"), ": ", shown))


def parse_pairs(pairs: Sequence[str], what: str) -> dict[str, str]:
    """`k=v` options into a dict, failing clearly on a malformed one."""
    result: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            fail(f"{what} must look like KEY=VALUE, got {pair!r}")
        result[key] = value
    return result
