"""The audit log (issue #21): one row per change a person or token made.

`audited` runs a change and writes its row in the same transaction, so a change
that fails records nothing and a recorded change happened. Job traffic of
runners and daemons is not audited.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from waystation.core.roles import Actor
from waystation.store.schema import audit_log

T = TypeVar("T")
OK = "ok"


@dataclass(frozen=True)
class AuditEntry:
    at: int  # microseconds since the epoch
    user: str
    token_id: str
    action: str
    object: str
    outcome: str
    peer: str


def record(conn: Connection, actor: Actor, action: str, obj: str, now: int) -> None:
    conn.execute(
        sa.insert(audit_log).values(
            at=now,
            user=actor.user,
            token_id=actor.token_id,
            action=action,
            object=obj,
            outcome=OK,
            peer=actor.peer,
        )
    )


def audited(
    conn: Connection,
    actor: Actor | None,
    action: str,
    obj: str,
    now: int,
    change: Callable[..., T],
    *args: Any,
) -> T:
    """`change(conn, *args)`, then its audit row (none when `actor` is None: auth off)."""
    result = change(conn, *args)
    if actor is not None:
        record(conn, actor, action, obj, now)
    return result


def audited_as(
    conn: Connection,
    actor: Actor | None,
    describe: Callable[[T], tuple[str, str] | None],
    now: int,
    change: Callable[..., T],
    *args: Any,
) -> T:
    """As `audited`, the action and object named by `describe(result)` (None: no change
    was made, nothing to record: a cancel of a job already finished)."""
    result = change(conn, *args)
    if actor is not None:
        described = describe(result)
        if described is not None:
            record(conn, actor, described[0], described[1], now)
    return result


def audit_list(
    conn: Connection, user: str, action: str, since: int, limit: int
) -> list[AuditEntry]:
    """Newest first; `user` and `action` match exactly when given (action also by prefix
    with a trailing dot: ``user.``)."""
    query = sa.select(audit_log).where(audit_log.c.at >= since)
    if user:
        query = query.where(sa.func.lower(audit_log.c.user) == user.lower())
    if action.endswith("."):
        query = query.where(audit_log.c.action.startswith(action, autoescape=True))
    elif action:
        query = query.where(audit_log.c.action == action)
    rows = conn.execute(query.order_by(audit_log.c.at.desc(), audit_log.c.id.desc()).limit(limit))
    return [
        AuditEntry(r.at, r.user, r.token_id, r.action, r.object, r.outcome, r.peer) for r in rows
    ]


def audit_prune(conn: Connection, before: int) -> int:
    """Delete entries older than `before`; how many."""
    result = conn.execute(sa.delete(audit_log).where(audit_log.c.at < before))
    return int(result.rowcount or 0)
