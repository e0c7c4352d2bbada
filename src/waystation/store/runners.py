"""Runners and config variables.

A runner is registered by its RunnerConfig stream and stays known (GetRunner,
job assignment) after it disconnects. It is *online* while a server holding
its config stream keeps renewing `online_until`: a lease, so a server that
dies cannot leave its runners online forever.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from waystation import validate
from waystation.errors import FailedPrecondition, NotFound
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store.prepared import Prepared
from waystation.store.schema import config_vars, runners

ANY_RUNNER = "*"


def runner_register(conn: Connection, runner: vs.Runner, now: int, lease: int) -> vs.Runner:
    validate.name("runner", runner.id, field="id")
    rid = runner.id.lower()
    data = runner.SerializeToString(deterministic=True)
    validate.record_size("runner", len(data))
    values = {
        "by_id_only": runner.by_id_only,
        "last_seen": now,
        "online_until": now + lease,
        "data": data,
    }
    if not conn.execute(sa.update(runners).where(runners.c.id == rid).values(values)).rowcount:
        conn.execute(sa.insert(runners).values(id=rid, first_seen=now, **values))
    return runner


def runners_renew(conn: Connection, runner_ids: Iterable[str], now: int, lease: int) -> None:
    renew_leases(conn, runners, [r.lower() for r in runner_ids], now, lease)


def renew_leases(conn: Connection, table: sa.Table, ids: list[str], now: int, lease: int) -> None:
    """Keep these rows (runners, provisioner daemons) online for another lease."""
    for chunk in in_slices(ids):
        conn.execute(
            sa.update(table)
            .where(table.c.id.in_(chunk))
            .values(last_seen=now, online_until=now + lease)
        )


# Ids per IN (...) list: PostgreSQL takes at most 65,535 parameters a statement,
# many SQLite builds 32,766.
IN_SLICE = 1000


def in_slices(ids: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(ids), IN_SLICE):
        yield ids[start : start + IN_SLICE]


def runner_offline(conn: Connection, runner_id: str, now: int) -> None:
    conn.execute(
        sa.update(runners)
        .where(runners.c.id == runner_id.lower())
        .values(last_seen=now, online_until=None)
    )


def runner_get(conn: Connection, runner_id: str) -> vs.Runner:
    row = _GET.one(conn, id=runner_id.lower())  # every RunnerJobStream starts here
    if row is None:
        raise NotFound("runner ID not found")
    return vs.Runner.FromString(row[0])


_GET = Prepared(sa.select(runners.c.data).where(runners.c.id == sa.bindparam("id")))


def runners_list(conn: Connection, now: int) -> list[tuple[vs.Runner, bool, int]]:
    """Every known runner with whether it is online and when it was last seen."""
    rows = conn.execute(sa.select(runners).order_by(runners.c.id))
    return [(vs.Runner.FromString(r.data), (r.online_until or 0) > now, r.last_seen) for r in rows]


def runner_assignable(conn: Connection, runner_id: str | None, now: int) -> bool:
    """Is an online runner able to take a job aimed at `runner_id` (None: any)?"""
    query = sa.select(runners.c.id).where(runners.c.online_until > now)
    if runner_id is None:
        query = query.where(runners.c.by_id_only.is_(False))
    else:
        query = query.where(runners.c.id == runner_id.lower())
    return conn.execute(query.limit(1)).first() is not None


# -- config variables ------------------------------------------------------------


def _scope(var: vs.ConfigVar) -> tuple[str, str]:
    which = var.WhichOneof("scope")
    if which == "runner":
        if var.runner.HasField("id"):
            validate.name("config variable", var.runner.id.id, field="runner id")
            return "runner", var.runner.id.id.lower()
        if var.runner.HasField("any"):
            return "runner", ANY_RUNNER
        raise FailedPrecondition("config variable runner scope needs any or id")
    if which in ("basis", "project", "target"):
        ref = getattr(var, which)
        if not ref.resource_id:
            raise FailedPrecondition(f"config variable {which} scope needs a resource_id")
        return which, ref.resource_id
    raise FailedPrecondition(f"config variable {var.name!r} needs a scope")


def config_set(conn: Connection, variables: list[vs.ConfigVar]) -> bool:
    """Set (or, with an empty value, delete) variables; True if runner config changed."""
    runner_changed = False
    for var in variables:
        validate.name("config variable", var.name)
        if len(var.value) > validate.MAX_RECORD:
            validate.record_size("config variable", len(var.value))
        kind, scope_id = _scope(var)
        key = (
            config_vars.c.scope_kind == kind,
            config_vars.c.scope_id == scope_id,
            config_vars.c.name == var.name,
        )
        conn.execute(sa.delete(config_vars).where(*key))
        if var.value:
            conn.execute(
                sa.insert(config_vars).values(
                    scope_kind=kind, scope_id=scope_id, name=var.name, value=var.value
                )
            )
        runner_changed |= kind == "runner"
    return runner_changed


def config_get(conn: Connection, request: vs.ConfigGetRequest) -> list[vs.ConfigVar]:
    which = request.WhichOneof("scope")
    if which is None:
        raise FailedPrecondition("config scope is required")
    if which == "runner":
        return runner_config(conn, request.runner.id, request.prefix)
    ref = getattr(request, which)
    if not ref.resource_id:
        raise FailedPrecondition(f"config {which} scope needs a resource_id")
    rows = conn.execute(
        sa.select(config_vars.c.name, config_vars.c.value).where(
            config_vars.c.scope_kind == which,
            config_vars.c.scope_id == ref.resource_id,
            _has_prefix(request.prefix),
        )
    )
    variables = []
    for r in sorted(rows, key=lambda r: r.name):  # code-point order, whatever the collation
        var = vs.ConfigVar(name=r.name, value=r.value)
        getattr(var, which).resource_id = ref.resource_id
        variables.append(var)
    return variables


def _has_prefix(prefix: str) -> sa.ColumnElement[bool]:
    # Not LIKE: SQLite's LIKE ignores case, and names are case-sensitive.
    return sa.func.substr(config_vars.c.name, 1, len(prefix)) == prefix


def runner_config(conn: Connection, runner_id: str, prefix: str = "") -> list[vs.ConfigVar]:
    """Variables for any runner, then this runner's (which win on a clash), by name."""
    rows = conn.execute(
        sa.select(config_vars.c.scope_id, config_vars.c.name, config_vars.c.value).where(
            config_vars.c.scope_kind == "runner",
            config_vars.c.scope_id.in_([ANY_RUNNER, runner_id.lower()]),
            _has_prefix(prefix),
        )
    )
    merged: dict[str, vs.ConfigVar] = {}
    for r in sorted(rows, key=lambda r: r.scope_id != ANY_RUNNER):
        var = vs.ConfigVar(name=r.name, value=r.value)
        if r.scope_id == ANY_RUNNER:
            var.runner.any.SetInParent()
        else:
            var.runner.id.id = runner_id
        merged[r.name] = var
    return [merged[name] for name in sorted(merged)]
