"""Job output: batches persisted in order, read back by job or by scope."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from waystation.errors import FailedPrecondition, NotFound
from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store.jobs import resolve_scope
from waystation.store.prepared import Prepared
from waystation.store.schema import job_output, jobs


def output_append(conn: Connection, job_id: str, first_seq: int, batches: list[bytes]) -> None:
    _OUTPUT_APPEND.run_many(
        conn, [{"job_id": job_id, "seq": first_seq + i, "data": b} for i, b in enumerate(batches)]
    )


_OUTPUT_APPEND = Prepared(
    sa.insert(job_output).values(
        job_id=sa.bindparam("job_id"), seq=sa.bindparam("seq"), data=sa.bindparam("data")
    )
)


def output_read(
    conn: Connection, job_id: str, after_seq: int = -1, limit: int = 1000
) -> list[tuple[int, bytes]]:
    rows = conn.execute(
        sa.select(job_output.c.seq, job_output.c.data)
        .where(job_output.c.job_id == job_id, job_output.c.seq > after_seq)
        .order_by(job_output.c.seq)
        .limit(limit)
    )
    return [(r.seq, r.data) for r in rows]


def output_next_seq(conn: Connection, job_id: str) -> int:
    row = _OUTPUT_LAST.one(conn, job_id=job_id)
    return 0 if row is None or row[0] is None else int(row[0]) + 1


_OUTPUT_LAST = Prepared(
    sa.select(sa.func.max(job_output.c.seq)).where(job_output.c.job_id == sa.bindparam("job_id"))
)


# -- logs by scope -----------------------------------------------------------------

ScopeRef = sdk.Ref.Basis | sdk.Ref.Project | sdk.Ref.Target


def scope_output(
    conn: Connection, kind: str, ref: ScopeRef, cursor: dict[str, int], since: int | None
) -> list[tuple[str, int, bytes]]:
    """Output rows of a scope's jobs past `cursor` (job id -> last seq read), in order.

    With `since` (microseconds), only jobs still active or finished after it
    are looked at: older ones cannot have new output.
    """
    job = vs.Job()
    getattr(job, kind).CopyFrom(ref)
    try:
        scope = resolve_scope(conn, job)
    except (NotFound, FailedPrecondition):
        raise NotFound(f"log stream {kind} not found") from None
    column, value = {
        "basis": (jobs.c.basis_id, scope.basis_id),
        "project": (jobs.c.project_id, scope.project_id),
        "target": (jobs.c.target_id, scope.target_id),
    }[kind]
    query = sa.select(jobs.c.id).where(column == value).order_by(jobs.c.queue_time, jobs.c.id)
    if since is not None:
        query = query.where(sa.or_(jobs.c.complete_time.is_(None), jobs.c.complete_time >= since))
    rows: list[tuple[str, int, bytes]] = []
    for job_id in conn.execute(query).scalars():
        for seq, data in output_read(conn, job_id, cursor.get(job_id, -1), limit=100_000):
            rows.append((job_id, seq, data))
    return rows
