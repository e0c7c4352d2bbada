"""`waystation snapshot create|restore`: the whole store, to a file and back."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, BinaryIO

import typer
from google.protobuf.empty_pb2 import Empty

from waystation.cli.output import Context, fail, rpc_errors
from waystation.files import open_private
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc

app = typer.Typer(
    help="Snapshots of the whole store (it holds the signing keys: keep them secret).",
    no_args_is_help=True,
)
CHUNK = 1024 * 1024
TIMEOUT = 3600.0  # a snapshot of a large store takes a while; the server bounds nothing here


@app.command("create")
def create(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="The file to write, or - for standard output.")],
) -> None:
    """Save a snapshot of the whole store to PATH."""
    c: Context = ctx.obj
    stub = admin_grpc.AdminStub(c.channel)
    if path == "-":
        _receive(c, stub, sys.stdout.buffer)
        return
    target = Path(path)
    partial = target.with_name(target.name + ".partial")
    try:
        # 0600 whatever the umask: a snapshot holds the token signing keys.
        with os.fdopen(open_private(partial), "wb") as out:
            size = _receive(c, stub, out)
            os.fsync(out.fileno())
        partial.replace(target)  # never a half-written file under the name asked for
    finally:
        partial.unlink(missing_ok=True)
    typer.echo(f"snapshot written to {target} ({size:,} bytes)")


def _receive(c: Context, stub: admin_grpc.AdminStub, out: BinaryIO) -> int:
    size = 0
    with rpc_errors(c, "snapshot"):
        responses: Any = stub.CreateSnapshot(Empty(), timeout=TIMEOUT)
        first = next(responses, None)
        if first is None or first.WhichOneof("event") != "open":
            fail("snapshot: the server did not open the snapshot")
        for response in responses:
            out.write(response.chunk)
            size += len(response.chunk)
    out.flush()
    return size


@app.command("restore")
def restore(
    ctx: typer.Context,
    path: Annotated[str, typer.Argument(help="The snapshot file, or - for standard input.")],
    exit_server: Annotated[
        bool,
        typer.Option(
            "--exit", help="Shut the server down once staged (something must restart it)."
        ),
    ] = False,
) -> None:
    """Stage PATH to replace the whole store at the server's next start."""
    c: Context = ctx.obj
    stub = admin_grpc.AdminStub(c.channel)
    source: BinaryIO = sys.stdin.buffer if path == "-" else _open(path)

    def requests() -> Iterator[vs.RestoreSnapshotRequest]:
        yield vs.RestoreSnapshotRequest(open=vs.RestoreSnapshotRequest.Open(exit=exit_server))
        while chunk := source.read(CHUNK):
            yield vs.RestoreSnapshotRequest(chunk=chunk)

    with source, rpc_errors(c, "restore"):
        stub.RestoreSnapshot(requests(), timeout=TIMEOUT)
    then = "it has shut down" if exit_server else "restart it to apply"
    typer.echo(f"snapshot staged on the server; {then}")


def _open(path: str) -> BinaryIO:
    try:
        return Path(path).open("rb")
    except OSError as exc:
        fail(f"cannot read {path}: {exc.strerror}")
