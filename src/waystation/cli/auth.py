"""`waystation login`, `waystation token ...` and `waystation context ...`."""

from __future__ import annotations

import functools
from typing import Annotated, Any

import grpc
import typer
from google.protobuf.empty_pb2 import Empty

from waystation.cli.output import (
    Context,
    call,
    fail,
    out,
    print_data,
    print_json,
    print_table,
    rfc3339,
    rpc_errors,
)
from waystation.client import Connection, Contexts
from waystation.core.wire import INVITE_ROLE, TOKEN_LABEL, TOKEN_TTL, TOKEN_USER
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.waystation.v1 import admin_pb2 as admin
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc
from waystation.protocol.waystation.v1 import users_pb2 as pu
from waystation.protocol.waystation.v1 import users_pb2_grpc as users_grpc

token_app = typer.Typer(help="Mint and revoke tokens.", no_args_is_help=True)
context_app = typer.Typer(help="Saved servers and their credentials.", no_args_is_help=True)
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


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
    user: Annotated[
        str, typer.Option("--user", help="Bootstrap: the first admin's name. [default: admin]")
    ] = "",
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
            metadata = ((TOKEN_USER, user),) if user else ()
            token = stub.BootstrapToken(Empty(), timeout=30, metadata=metadata).token
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
    user: Annotated[
        str,
        typer.Option("--user", help="Who it is for (created on first use). [default: you]"),
    ] = "",
    role: Annotated[
        str, typer.Option("--role", help="The role the user is created with, if new.")
    ] = "member",
    label: Annotated[str, typer.Option("--label", help="A note for `token list`.")] = "",
) -> None:
    """Mint an invite token for someone else to `waystation login --invite`."""
    c: Context = ctx.obj
    request = vs.InviteTokenRequest(duration=duration)
    metadata = (*_for_user(user), (INVITE_ROLE, role), *_labelled(label))
    mint = functools.partial(vs_grpc.VagrantStub(c.channel).GenerateInviteToken, metadata=metadata)
    out.print(call(c, mint, request).token)


@token_app.command("login")
def login_token(
    ctx: typer.Context,
    user: Annotated[
        str, typer.Option("--user", help="Who it is for (others: admins only). [default: you]")
    ] = "",
    ttl: Annotated[
        str,
        typer.Option("--ttl", help="Valid this long: 30d, 12h (0: until revoked, admins only)."),
    ] = "",
    label: Annotated[str, typer.Option("--label", help="A note for `token list`.")] = "",
) -> None:
    """Mint a login token, e.g. for a runner (`waystation token login --user ci-runner-1`).
    [default TTL: the server's --token-ttl]"""
    c: Context = ctx.obj
    metadata = (*_for_user(user), *(((TOKEN_TTL, ttl),) if ttl else ()), *_labelled(label))
    mint = functools.partial(vs_grpc.VagrantStub(c.channel).GenerateLoginToken, metadata=metadata)
    out.print(call(c, mint, Empty()).token)


@token_app.command("list")
def list_tokens(
    ctx: typer.Context,
    user: Annotated[
        str, typer.Option("--user", help="Only this user's. [default: yours; an admin's: all]")
    ] = "",
    as_json: Json = False,
) -> None:
    """Tokens minted since users existed: id, user, label, created, expires, last used."""
    c: Context = ctx.obj
    request = pu.ListTokensRequest(user=user)
    found = call(c, users_grpc.UsersStub(c.channel).ListTokens, request).tokens
    if as_json:
        return print_json(list(found))
    rows = [
        [
            t.id,
            t.user,
            t.kind + (" (revoked)" if t.revoked else ""),
            t.label or "-",
            rfc3339(t.created_at),
            rfc3339(t.expires_at) if t.HasField("expires_at") else "never",
            rfc3339(t.last_used_at) if t.HasField("last_used_at") else "-",
        ]
        for t in found
    ]
    columns = ["ID", "USER", "KIND", "LABEL", "CREATED", "EXPIRES", "LAST USED"]
    print_table(columns, rows, "no tokens")


def _for_user(user: str) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_USER, user),) if user else ()


def _labelled(label: str) -> tuple[tuple[str, str], ...]:
    return ((TOKEN_LABEL, label),) if label else ()


def _claims(text: str) -> dict[str, Any]:
    """What a token says of itself, decoded here and NOT verified (only the server can)."""
    from waystation.auth.tokens import unverified

    try:
        claims, key_id = unverified(text)
    except Exception as exc:
        fail(f"not a waystation token: {exc}")
    return {
        "id": claims.token_id.hex(),
        "kind": "invite" if claims.invite else "login",
        "user": claims.user,
        "key_id": key_id,
        # RFC 3339; None: valid until revoked (or its key retired).
        "valid_until": rfc3339(claims.valid_until) if claims.HasField("valid_until") else None,
    }


@token_app.command("inspect")
def inspect_token(
    ctx: typer.Context,
    token: Annotated[str, typer.Argument(help="A token (default: the one in use).")] = "",
    as_json: Json = False,
) -> None:
    """Show a token's id (for revoke) and claims, without checking its signature."""
    c: Context = ctx.obj
    text = token or c.connection.token
    if not text:
        fail("no token given and none saved: pass one")
    claims = _claims(text)
    if as_json:
        return print_data(claims)
    row = [claims["id"], claims["kind"], claims["user"], claims["key_id"]]
    print_table(
        ["id", "kind", "user", "key", "valid until"], [[*row, claims["valid_until"] or "-"]], ""
    )


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
def context_list(as_json: Json = False) -> None:
    """List saved contexts; the current one is marked."""
    saved = Contexts.load()
    if as_json:
        # Never the tokens themselves: whether one is saved.
        return print_data(
            [
                {
                    "name": name,
                    "current": name == saved.current,
                    "address": conn.address,
                    "tls": conn.uses_tls,
                    "tls_ca": conn.tls_ca or None,
                    "tls_skip_verify": conn.tls_skip_verify,
                    "logged_in": bool(conn.token),
                }
                for name, conn in sorted(saved.contexts.items())
            ]
        )
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


@context_app.command("delete")
def context_delete(name: str, as_json: Json = False) -> None:
    """Forget a saved context (its token is not revoked: `waystation token revoke ID`)."""
    saved = Contexts.load()
    if name not in saved.contexts:
        fail(f"no context {name!r}: see `waystation context list`")
    del saved.contexts[name]
    was_current = saved.current == name
    if was_current:
        saved.current = ""
    saved.save()
    if as_json:
        return print_data({"deleted": name, "was_current": was_current})
    note = ""
    if was_current and saved.contexts:
        note = "; no context is current now: `waystation context use NAME`"
    out.print(f"deleted context {name}{note}", markup=False)


def logout(ctx: typer.Context, as_json: Json = False) -> None:
    """Forget the current context's token here (the server still accepts it until revoked)."""
    c: Context = ctx.obj
    saved = Contexts.load()
    name = c.context_name
    conn = saved.contexts.get(name)
    if conn is None:
        fail("no current context to log out of: see `waystation context list`")
    forgotten = conn.token
    token_id = _claims(forgotten)["id"] if forgotten else None
    if forgotten:
        conn.token = ""
        saved.save()
    # A --token or WAYSTATION_TOKEN given with this command is not ours to forget.
    still = bool(c.connection.token) and c.connection.token != forgotten
    if as_json:
        return print_data(
            {
                "context": name,
                "address": conn.address,
                "forgotten_token_id": token_id,
                "token_still_given": still,
            }
        )
    if token_id is None:
        out.print(f"context {name} ({conn.address}) has no saved token: nothing to forget")
    else:
        out.print(
            f"logged out of context {name} ({conn.address}): its token {token_id} is forgotten "
            f"here; the server accepts it until it is revoked (`waystation token revoke "
            f"{token_id}`)",
            markup=False,
        )
    if still:
        out.print("note: a token given by --token or WAYSTATION_TOKEN is still in use")


def whoami(ctx: typer.Context, as_json: Json = False) -> None:
    """Who the server takes you for: address, user, token id and expiry, and whether it
    accepts the token (exit 1 if not)."""
    c: Context = ctx.obj
    claims = _claims(c.connection.token) if c.connection.token else None
    refused, role = _ask(c)
    info = {
        "address": c.address,
        "context": c.context_name or None,
        "user": claims["user"] if claims else None,
        "role": role,
        "token_id": claims["id"] if claims else None,
        "kind": claims["kind"] if claims else None,
        "expires": claims["valid_until"] if claims else None,  # None: never
        "accepted": refused is None,
        "refused_because": refused,
    }
    if as_json:
        print_data(info)
    else:
        context = f" (context {c.context_name})" if c.context_name else ""
        lines = [("server", f"{c.address}{context}")]
        if claims is None:
            lines.append(("token", "none (`waystation login`, or pass --token)"))
        else:
            lines += [
                ("user", claims["user"] or "-"),
                ("role", role or "-"),
                ("token id", claims["id"]),
                ("expires", claims["valid_until"] or "never"),
            ]
        verdict = "accepted" if refused is None else f"refused: {refused}"
        if refused is None and claims is None:
            verdict = "accepted without a token (authentication is off on this server)"
        lines.append(("server says", verdict))
        width = max(len(label) for label, _ in lines) + 1
        for label, value in lines:
            out.print(f"{label + ':':<{width}} {value}", markup=False)
    if refused is not None:
        raise typer.Exit(1)


def _ask(c: Context) -> tuple[str | None, str | None]:
    """Whether the server accepts our token (None, or its reason) and the role of
    its user (None if unknown), by WhoAmI: anyone may call it."""
    try:
        answer = users_grpc.UsersStub(c.channel).WhoAmI(Empty(), timeout=30)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:  # a server before users
            if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                return exc.details() or exc.code().name, None
            with rpc_errors(c):
                raise
        return _refusal(c), None
    return None, answer.user.role or None


def _refusal(c: Context) -> str | None:
    """Ask the server whether it accepts our token, by one cheap authenticated call:
    None if it does, else its reason. Any answer but an auth refusal means the call
    got past the token check (a job that does not exist is NOT_FOUND)."""
    stub = vs_grpc.VagrantStub(c.channel)
    try:
        stub.GetJob(vs.GetJobRequest(job_id="00000000000000000000000000"), timeout=30)
    except grpc.RpcError as exc:
        if exc.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
            details: str = exc.details() or exc.code().name
            return details
        if exc.code() not in (grpc.StatusCode.NOT_FOUND, grpc.StatusCode.INVALID_ARGUMENT):
            with rpc_errors(c):
                raise
    return None
