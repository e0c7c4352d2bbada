"""`waystation login`, `waystation token ...` and `waystation context ...`."""

from __future__ import annotations

from typing import Annotated

import grpc
import typer
from google.protobuf.empty_pb2 import Empty

from waystation.cli.output import Context, call, fail, out, print_table, rpc_errors
from waystation.client import Connection, Contexts
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.waystation.v1 import admin_pb2 as admin
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc

token_app = typer.Typer(help="Mint and revoke tokens.", no_args_is_help=True)
context_app = typer.Typer(help="Saved servers and their credentials.", no_args_is_help=True)


def login(
    ctx: typer.Context,
    invite: Annotated[
        str, typer.Option("--invite", help="An invite token from `waystation token invite`.")
    ] = "",
    name: Annotated[
        str, typer.Option("--name", help="Save as this context. [default: the address]")
    ] = "",
    address: Annotated[
        str | None, typer.Option("--address", "-a", help="The server, HOST:PORT.")
    ] = None,
    tls: Annotated[bool, typer.Option("--tls", help="Connect with TLS.")] = False,
    tls_ca: Annotated[str | None, typer.Option("--tls-ca", help="CA bundle to trust.")] = None,
    tls_skip_verify: Annotated[
        bool, typer.Option("--tls-skip-verify", help="Trust any server certificate.")
    ] = False,
) -> None:
    """Log in: bootstrap a fresh server, or turn an invite into a login token.

    On the machine of a fresh server, `waystation login` takes the one-time
    bootstrap token. Elsewhere, `waystation login --invite TOKEN --address
    HOST:PORT`. The token is saved (mode 0600) as a context and made current.
    """
    base: Context = ctx.obj
    c = Context(
        Connection(
            address=address or base.connection.address,
            tls=tls or base.connection.tls,
            tls_ca=tls_ca if tls_ca is not None else base.connection.tls_ca,
            tls_skip_verify=tls_skip_verify or base.connection.tls_skip_verify,
        )
    )
    stub = vs_grpc.VagrantStub(c.channel)
    if invite:
        request = vs.ConvertInviteTokenRequest(token=invite)
        token = call(c, stub.ConvertInviteToken, request).token
    else:
        try:
            token = stub.BootstrapToken(Empty(), timeout=30).token
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                fail(
                    "this server is already bootstrapped: ask someone logged in for an invite "
                    "(`waystation token invite`) and run `waystation login --invite TOKEN`"
                )
            with rpc_errors(c):
                raise
    connection = Connection(
        address=c.connection.address,
        token=token,
        tls=c.connection.tls,
        tls_ca=c.connection.tls_ca,
        tls_skip_verify=c.connection.tls_skip_verify,
    )
    saved = Contexts.load()
    context = name or c.connection.address
    saved.contexts[context] = connection
    saved.current = context
    path = saved.save()
    out.print(f"logged in to {connection.address}; saved as context {context!r} in {path}")


@token_app.command("invite")
def invite_token(
    ctx: typer.Context,
    duration: Annotated[str, typer.Option("--duration", help="How long it is valid.")] = "24h",
) -> None:
    """Mint an invite token for someone else to `waystation login --invite`."""
    c: Context = ctx.obj
    request = vs.InviteTokenRequest(duration=duration)
    out.print(call(c, vs_grpc.VagrantStub(c.channel).GenerateInviteToken, request).token)


@token_app.command("login")
def login_token(ctx: typer.Context) -> None:
    """Mint a login token, e.g. for a runner (`waystation runner --token ...`)."""
    c: Context = ctx.obj
    out.print(call(c, vs_grpc.VagrantStub(c.channel).GenerateLoginToken, Empty()).token)


@token_app.command("inspect")
def inspect_token(
    ctx: typer.Context,
    token: Annotated[str, typer.Argument(help="A token (default: the one in use).")] = "",
) -> None:
    """Show a token's id (for revoke) and claims, without checking its signature."""
    from waystation.auth.tokens import unverified

    c: Context = ctx.obj
    text = token or c.connection.token
    if not text:
        fail("no token given and none saved: pass one")
    try:
        claims, key_id = unverified(text)
    except Exception as exc:
        fail(f"not a waystation token: {exc}")
    kind = "invite" if claims.invite else "login"
    valid = claims.valid_until.ToDatetime().isoformat() if claims.HasField("valid_until") else "-"
    rows = [[claims.token_id.hex(), kind, claims.user, key_id, valid]]
    print_table(["id", "kind", "user", "key", "valid until"], rows, "")


@token_app.command("revoke")
def revoke_token(
    ctx: typer.Context,
    token_id: Annotated[str, typer.Argument(help="The token id (see `waystation token inspect`).")],
) -> None:
    """Revoke a token: every server sharing the database refuses it at once."""
    c: Context = ctx.obj
    request = admin.RevokeTokenRequest(token_id=token_id)
    revoked = call(c, admin_grpc.AdminStub(c.channel).RevokeToken, request).revoked
    out.print(f"revoked {token_id}" if revoked else f"{token_id} was already revoked")


@context_app.command("list")
def context_list() -> None:
    """List saved contexts; the current one is marked."""
    saved = Contexts.load()
    rows = [
        ["*" if name == saved.current else "", name, conn.address, "yes" if conn.uses_tls else "no"]
        for name, conn in sorted(saved.contexts.items())
    ]
    print_table(["", "name", "address", "tls"], rows, "no contexts: run `waystation login`")


@context_app.command("use")
def context_use(name: str) -> None:
    """Make a saved context the current one."""
    saved = Contexts.load()
    if name not in saved.contexts:
        fail(f"no context {name!r}: see `waystation context list`")
    saved.current = name
    saved.save()
    out.print(f"using {name} ({saved.contexts[name].address})")
