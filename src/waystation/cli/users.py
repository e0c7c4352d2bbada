"""`waystation user`: users and their roles (issue #21); admins only."""

from __future__ import annotations

import datetime
from typing import Annotated

import typer
from google.protobuf.empty_pb2 import Empty

from waystation.cli.output import (
    Context,
    call,
    fail,
    out,
    print_json,
    print_record,
    print_table,
    rfc3339,
)
from waystation.core.roles import Role
from waystation.durations import DurationError, parse_go_duration
from waystation.protocol.waystation.v1 import users_pb2 as pu
from waystation.protocol.waystation.v1 import users_pb2_grpc as users_grpc

app = typer.Typer(help="Users and their roles (admins only).", no_args_is_help=True)
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
ROLES = "|".join(r.value for r in Role)
RoleOption = Annotated[Role, typer.Option("--role", help="What the user may do.")]


def stub(c: Context) -> users_grpc.UsersStub:
    return users_grpc.UsersStub(c.channel)


@app.command("create")
def create(ctx: typer.Context, name: str, role: RoleOption = Role.MEMBER) -> None:
    """Create a user; then `waystation token login --user NAME` mints their token."""
    c: Context = ctx.obj
    user = call(c, stub(c).CreateUser, pu.CreateUserRequest(name=name, role=role.value))
    out.print(f"created user {user.name} ({user.role})", markup=False)


@app.command("list")
def list_users(ctx: typer.Context, as_json: Json = False) -> None:
    """Every user: name, role, created, disabled."""
    c: Context = ctx.obj
    users = call(c, stub(c).ListUsers, Empty()).users
    if as_json:
        return print_json(list(users))
    rows = [
        [u.name, u.role, rfc3339(u.created_at), rfc3339(u.disabled_at) if u.disabled else "-"]
        for u in users
    ]
    print_table(["NAME", "ROLE", "CREATED", "DISABLED"], rows, "no users")


@app.command("get")
def get(ctx: typer.Context, name: str, as_json: Json = False) -> None:
    """One user."""
    c: Context = ctx.obj
    user = call(c, stub(c).GetUser, pu.UserRef(name=name))
    if as_json:
        return print_json(user)
    print_record(user)


@app.command("set-role")
def set_role(ctx: typer.Context, name: str, role: Role) -> None:
    """Change a user's role: it acts on their tokens at once."""
    c: Context = ctx.obj
    user = call(c, stub(c).SetUserRole, pu.SetUserRoleRequest(name=name, role=role.value))
    out.print(f"user {user.name} is now {user.role}", markup=False)


@app.command("disable")
def disable(ctx: typer.Context, name: str) -> None:
    """Disable a user: every token of theirs is refused at once, on every replica."""
    c: Context = ctx.obj
    user = call(c, stub(c).DisableUser, pu.UserRef(name=name))
    out.print(f"user {user.name} is disabled", markup=False)


@app.command("delete")
def delete(ctx: typer.Context, name: str) -> None:
    """Delete a user: their tokens stop working."""
    c: Context = ctx.obj
    call(c, stub(c).DeleteUser, pu.UserRef(name=name))
    out.print(f"deleted user {name}", markup=False)


audit_app = typer.Typer(help="Who changed what (admins only).", no_args_is_help=True)


@audit_app.command("list")
def audit_list(
    ctx: typer.Context,
    user: Annotated[str, typer.Option("--user", help="Only this user's.")] = "",
    action: Annotated[
        str, typer.Option("--action", help="Only this action (user.create), or prefix (user.).")
    ] = "",
    since: Annotated[
        str, typer.Option("--since", help="Only this recent (a duration: 24h, 90m).")
    ] = "",
    limit: Annotated[int, typer.Option("--limit", help="Newest N.")] = 1000,
    as_json: Json = False,
) -> None:
    """The audit log, newest first: time, user, token, action, object, outcome, peer."""
    c: Context = ctx.obj
    request = pu.ListAuditEventsRequest(user=user, action=action, limit=max(limit, 0))
    if since:
        try:
            ago = parse_go_duration(since)
        except DurationError as exc:
            fail(f"invalid --since {since!r}: {exc}")
        request.since.FromDatetime(datetime.datetime.now(datetime.UTC) - ago)
    events = call(c, users_grpc.AuditStub(c.channel).ListAuditEvents, request).events
    if as_json:
        return print_json(list(events))
    rows = [
        [rfc3339(e.at), e.user, e.token_id[:8] or "-", e.action, e.object or "-", e.outcome, e.peer]
        for e in events
    ]
    columns = ["TIME", "USER", "TOKEN", "ACTION", "OBJECT", "OUTCOME", "PEER"]
    print_table(columns, rows, "no audit entries")
