"""Provisioner daemons: seen (a lease, renewed while they wait), gone, listed."""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from waystation.core.states import RUNNING
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.store.prepared import Prepared
from waystation.store.provisioner_queue import KIND, Daemon, tags_json
from waystation.store.runners import renew_leases
from waystation.store.schema import jobs, provisioner_daemons


def daemon_seen(conn: Connection, daemon: Daemon, now: int, lease: int) -> None:
    values = {
        "id": daemon.id,
        "provisioners": json.dumps(sorted(daemon.provisioners)),
        "tags": tags_json(daemon.tags),
        "now": now,
        "until": now + lease,
    }
    if not _DAEMON_SEEN.count(conn, **values):
        _DAEMON_NEW.run(conn, **values)


_daemon_values: dict[str, Any] = {
    "provisioners": sa.bindparam("provisioners"),
    "tags": sa.bindparam("tags"),
    "last_seen": sa.bindparam("now"),
    "online_until": sa.bindparam("until"),
}
_DAEMON_SEEN = Prepared(
    sa.update(provisioner_daemons)
    .where(provisioner_daemons.c.id == sa.bindparam("id"))
    .values(_daemon_values)
)
_DAEMON_NEW = Prepared(
    sa.insert(provisioner_daemons).values(
        id=sa.bindparam("id"), first_seen=sa.bindparam("now"), **_daemon_values
    )
)


def daemons_renew(conn: Connection, daemon_ids: Iterable[str], now: int, lease: int) -> None:
    renew_leases(conn, provisioner_daemons, list(daemon_ids), now, lease)


def daemon_left(conn: Connection, daemon_id: str, now: int) -> None:
    conn.execute(
        sa.update(provisioner_daemons)
        .where(provisioner_daemons.c.id == daemon_id)
        .values(last_seen=now, online_until=None)
    )


def tags_text(tags: Mapping[str, str]) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in sorted(tags.items())) + "}" if tags else "{}"


def daemons_list_rows(
    conn: Connection, now: int
) -> list[tuple[Daemon, bool, Row[tuple[object, ...]]]]:
    rows = conn.execute(sa.select(provisioner_daemons).order_by(provisioner_daemons.c.id)).all()
    return [
        (
            Daemon(r.id, tuple(json.loads(r.provisioners)), json.loads(r.tags)),
            r.online_until is not None and r.online_until >= now,
            r,
        )
        for r in rows
    ]


def daemons_list(conn: Connection, now: int) -> list[pv.ProvisionerDaemon]:
    busy = dict(
        conn.execute(
            sa.select(jobs.c.holder_key, jobs.c.id).where(
                jobs.c.kind == KIND, jobs.c.state == RUNNING
            )
        ).all()
    )
    result = []
    for daemon, online, row in daemons_list_rows(conn, now):
        message = pv.ProvisionerDaemon(
            id=daemon.id,
            provisioners=daemon.provisioners,
            tags=daemon.tags,
            online=online,
            current_job_id=busy.get(daemon.id, ""),
        )
        message.first_seen.FromMicroseconds(row.first_seen)
        message.last_seen.FromMicroseconds(row.last_seen)
        result.append(message)
    return result
