"""Job transactions: every transition of the state machine is one of these.

The rules (waystation.core.states) are applied here, inside the transaction,
with conditional UPDATEs (`... WHERE state = X`) so that a transition happens
once even when two server replicas race for it. Assignment locks its
candidate rows with FOR UPDATE SKIP LOCKED on PostgreSQL (SQLite has one
writer), and a partial unique index refuses a second held job per scope.
"""

from __future__ import annotations

from collections import namedtuple
from dataclasses import dataclass
from enum import Enum
from typing import Any, Literal

import sqlalchemy as sa
from google.rpc import status_pb2
from sqlalchemy.engine import Connection

from waystation.core.states import (
    FINAL,
    HELD,
    QUEUED,
    RUNNING,
    WAITING,
    Ending,
    serialization_key,
    state_name,
)
from waystation.core.states import VAGRANT as VAGRANT  # jobs.kind of runner jobs; job_tx.VAGRANT
from waystation.errors import FailedPrecondition, NotFound
from waystation.ids import new_id
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store import resources
from waystation.store.lifecycle import Outcome, job_finish, job_take
from waystation.store.prepared import Prepared
from waystation.store.schema import bases, jobs, projects

# -- queue -----------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    basis_id: str | None = None
    project_id: str | None = None
    target_id: str | None = None


def resolve_scope(conn: Connection, job: vs.Job) -> Scope:
    """The resource ids a job acts on; the scope must exist if one is given."""
    which = job.WhichOneof("scope")
    if which == "target":
        target = resources.target_find(
            conn,
            vs.Target(
                resource_id=job.target.resource_id, name=job.target.name, project=job.target.project
            ),
        )
        owner = target.project
        return Scope(owner.basis.resource_id, owner.resource_id, target.resource_id)
    if which == "project":
        ref = job.project
        project = resources.project_find(
            conn,
            vs.Project(resource_id=ref.resource_id, name=ref.name, path=ref.path, basis=ref.basis),
        )
        return Scope(project.basis.resource_id, project.resource_id, None)
    if which == "basis":
        ref_b = job.basis
        basis = resources.basis_find(
            conn, vs.Basis(resource_id=ref_b.resource_id, name=ref_b.name, path=ref_b.path)
        )
        return Scope(basis.resource_id, None, None)
    return Scope()


def job_queue(conn: Connection, job: vs.Job, now: int, expires_in: int | None) -> str:
    """Persist a validated job as QUEUED; return its new id."""
    try:
        scope = resolve_scope(conn, job)
    except NotFound as exc:
        raise FailedPrecondition(f"job scope does not exist: {exc.message}") from None
    stored = vs.Job()
    stored.CopyFrom(job)
    _fill_data_source(conn, stored, scope)
    # Server-side fields are the row's columns; the client's values are ignored.
    for field in _SERVER_FIELDS:
        stored.ClearField(field)
    job_id = new_id()
    stored.id = job_id
    operation = job.WhichOneof("operation") or ""
    runner_id = job.target_runner.id.id.lower() if job.target_runner.HasField("id") else None
    _INSERT.run(
        conn,
        id=job_id,
        kind=VAGRANT,
        state=QUEUED,
        operation=operation,
        scope_key=serialization_key(operation, scope.basis_id, scope.project_id, scope.target_id),
        basis_id=scope.basis_id,
        project_id=scope.project_id,
        target_id=scope.target_id,
        runner_id=runner_id,
        queue_time=now,
        expire_time=now + expires_in if expires_in is not None else None,
        data=stored.SerializeToString(deterministic=True),
    )
    return job_id


_INSERT = Prepared(
    sa.insert(jobs).values(
        {
            column: sa.bindparam(column)
            for column in (
                "id",
                "kind",
                "state",
                "operation",
                "scope_key",
                "basis_id",
                "project_id",
                "target_id",
                "runner_id",
                "queue_time",
                "expire_time",
                "data",
            )
        }
    )
)


_SERVER_FIELDS: tuple[
    Literal[
        "state",
        "assigned_runner",
        "queue_time",
        "assign_time",
        "ack_time",
        "complete_time",
        "error",
        "result",
        "cancel_time",
        "expire_time",
    ],
    ...,
] = (
    "state",
    "assigned_runner",
    "queue_time",
    "assign_time",
    "ack_time",
    "complete_time",
    "error",
    "result",
    "cancel_time",
    "expire_time",
)


def _fill_data_source(conn: Connection, job: vs.Job, scope: Scope) -> None:
    """Upstream: a job without a data source takes its project's (or basis') default."""
    if job.HasField("data_source"):
        return
    for table, record_id, message in (
        (projects, scope.project_id, vs.Project),
        (bases, scope.basis_id, vs.Basis),
    ):
        if record_id is None:
            continue
        data = conn.execute(
            sa.select(table.c.data).where(table.c.resource_id == record_id)
        ).scalar()
        if data is not None:
            record = message.FromString(data)
            if record.HasField("data_source"):
                job.data_source.CopyFrom(record.data_source)
                return


# -- assign, ack, nack -------------------------------------------------------------


def job_assign(
    conn: Connection, runner_id: str, by_id_only: bool, now: int, ack_timeout: int
) -> vs.Job | None:
    """Give the runner the oldest QUEUED job it may run, now WAITING; None if none.
    `runner_id` is the id as the runner registered it, which the job keeps."""
    rid = runner_id.lower()
    for job_id, scope_key in _CANDIDATES[by_id_only].all(conn, rid=rid):
        take = (job_id, VAGRANT, rid, runner_id, now, now + ack_timeout)
        if scope_key is None:
            row = job_take(conn, *take)
        else:
            # The scope's unique index may refuse it: another replica took a job
            # of this scope just now.
            savepoint = conn.begin_nested()
            try:
                row = job_take(conn, *take)
            except sa.exc.IntegrityError:
                savepoint.rollback()
                continue
            savepoint.commit()
        if row is not None:
            return _message(JobRow._make(row))
    return None


@dataclass(frozen=True)
class Runner:
    """A runner parked for work: whom a queued job may be handed to at once."""

    id: str  # as it registered
    by_id_only: bool


def job_queue_and_hand(
    conn: Connection,
    job: vs.Job,
    now: int,
    expires_in: int | None,
    runner: Runner,
    ack_timeout: int,
) -> tuple[str, vs.Job | None]:
    """Queue the job, then assign the runner its oldest fitting job (usually
    this one) in the same commit: one transaction instead of two when a runner
    is already waiting. (the new job's id, the job assigned or None)"""
    job_id = job_queue(conn, job, now, expires_in)
    return job_id, job_assign(conn, runner.id, runner.by_id_only, now, ack_timeout)


def jobs_assignable_exist(conn: Connection, runner_id: str, by_id_only: bool) -> bool:
    """Whether job_assign would find a job for this runner now: a read, so that
    a runner with nothing to do costs no write transaction."""
    return _ANY_CANDIDATE[by_id_only].one(conn, rid=runner_id.lower()) is not None


def _fits(by_id_only: bool) -> sa.ColumnElement[bool]:
    """QUEUED jobs the runner may take whose scope no other job holds."""
    target = jobs.c.runner_id == sa.bindparam("rid")
    if not by_id_only:
        target = sa.or_(target, jobs.c.runner_id.is_(None))
    held = jobs.alias("held")
    not_blocked = sa.or_(
        jobs.c.scope_key.is_(None),
        ~sa.exists().where(
            held.c.scope_key == jobs.c.scope_key,
            sa.or_(*(held.c.state == state for state in HELD)),
        ),
    )
    return sa.and_(jobs.c.kind == VAGRANT, jobs.c.state == QUEUED, target, not_blocked)


_CANDIDATES = {
    flag: Prepared(
        sa.select(jobs.c.id, jobs.c.scope_key)
        .where(_fits(flag))
        .order_by(jobs.c.queue_time, jobs.c.id)
        .limit(8)
        .with_for_update(skip_locked=True)
    )
    for flag in (False, True)
}
_ANY_CANDIDATE = {
    flag: Prepared(sa.select(jobs.c.id).where(_fits(flag)).limit(1)) for flag in (False, True)
}


def _assignment(job_id: str, runner_id: str, assigned_at: int) -> sa.ColumnElement[bool]:
    """This very assignment: a stale stream of the same runner, whose job was
    requeued and assigned again since, must not act on the new assignment."""
    return sa.and_(
        jobs.c.id == job_id,
        jobs.c.state == WAITING,
        jobs.c.holder_key == runner_id.lower(),
        jobs.c.assign_time == assigned_at,
    )


def job_ack(
    conn: Connection,
    job_id: str,
    runner_id: str,
    assigned_at: int,
    now: int,
    heartbeat_timeout: int,
) -> vs.Job:
    row = _ACK.one(
        conn,
        id=job_id,
        rid=runner_id.lower(),
        assigned_at=assigned_at,
        now=now,
        deadline=now + heartbeat_timeout,
    )
    if row is None:
        raise FailedPrecondition("job is no longer assigned to this runner")
    return _message(JobRow._make(row))


_ACK = Prepared(
    sa.update(jobs)
    .where(
        jobs.c.id == sa.bindparam("id"),
        jobs.c.state == WAITING,
        jobs.c.holder_key == sa.bindparam("rid"),
        jobs.c.assign_time == sa.bindparam("assigned_at"),
    )
    .values(
        state=RUNNING,
        ack_time=sa.bindparam("now"),
        ack_deadline=None,
        liveness_deadline=sa.bindparam("deadline"),
    )
    .returning(*jobs.c)
)


def job_nack(conn: Connection, job_id: str, runner_id: str, assigned_at: int) -> bool:
    """Back to QUEUED for another runner; False if this assignment no longer stands."""
    return bool(
        conn.execute(
            sa.update(jobs).where(_assignment(job_id, runner_id, assigned_at)).values(REQUEUE)
        ).rowcount
    )


# A held job back to QUEUED (a nack here, the ack timeout in job_timers.py).
REQUEUE = {
    "state": QUEUED,
    "holder_key": None,
    "holder_id": None,
    "assign_time": None,
    "ack_deadline": None,
    "liveness_deadline": None,
}


# -- running ---------------------------------------------------------------------


def job_heartbeat(
    conn: Connection, job_id: str, runner_id: str, now: int, heartbeat_timeout: int
) -> bool:
    """Extend the heartbeat deadline; False if the job is no longer running here."""
    return bool(
        conn.execute(
            sa.update(jobs)
            .where(
                jobs.c.id == job_id,
                jobs.c.state == RUNNING,
                jobs.c.holder_key == runner_id.lower(),
            )
            .values(liveness_deadline=now + heartbeat_timeout)
        ).rowcount
    )


def job_resume(
    conn: Connection, job_id: str, runner_id: str, now: int, heartbeat_timeout: int
) -> vs.Job:
    """A runner carries on with its RUNNING job on a new stream (after losing the
    server): the job as it stands, its heartbeat deadline renewed. Anything else
    is FAILED_PRECONDITION saying why, and changes nothing."""
    row = _RESUME.one(conn, id=job_id, rid=runner_id.lower(), deadline=now + heartbeat_timeout)
    if row is not None:
        return _message(JobRow._make(row))
    try:
        current = job_row(conn, job_id)
    except NotFound:
        raise FailedPrecondition(f"cannot resume job {job_id}: no such job") from None
    if current.state != RUNNING:
        state = state_name(current.state)
        raise FailedPrecondition(f"cannot resume job {job_id}: it is {state}, not RUNNING")
    raise FailedPrecondition(f"cannot resume job {job_id}: it is held by another runner")


_RESUME = Prepared(
    sa.update(jobs)
    .where(
        jobs.c.id == sa.bindparam("id"),
        jobs.c.kind == VAGRANT,
        jobs.c.state == RUNNING,
        jobs.c.holder_key == sa.bindparam("rid"),
    )
    .values(liveness_deadline=sa.bindparam("deadline"))
    .returning(*jobs.c)
)


def job_complete(
    conn: Connection,
    job_id: str,
    runner_id: str,
    now: int,
    result: vs.Job.Result | None,
    error: status_pb2.Status | None,
) -> vs.Job:
    """RUNNING -> SUCCESS with a result, or ERROR with an error."""
    outcome = Outcome(
        Ending.FAILED if error is not None else Ending.COMPLETED,
        result=result.SerializeToString() if result is not None else None,
        error=error,
    )
    row = job_finish(
        conn, job_id, now, outcome, states=(RUNNING,), holder_key=runner_id.lower(), kind=VAGRANT
    )
    if row is not None:
        return _message(JobRow._make(row))
    # Not done: say why.
    current = job_row(conn, job_id)
    if current.holder_key != runner_id.lower():
        raise FailedPrecondition("job is not assigned to this runner")
    raise FailedPrecondition(f"job can't be completed from state: {state_name(current.state)}")


# -- cancel ----------------------------------------------------------------------


class CancelOutcome(Enum):
    NOTHING = "nothing"  # already finished
    ENDED = "ended"  # was QUEUED: ERROR at once
    SIGNALLED = "signalled"  # held by a runner: asked to stop
    FORCED = "forced"  # second cancel: ERROR at once, runner told to stop now


def job_cancel(conn: Connection, job_id: str, now: int, kind: str = "vagrant") -> CancelOutcome:
    row = job_row(conn, job_id, lock=True, kind=kind)
    if row.state in FINAL:
        outcome = CancelOutcome.NOTHING
    elif row.state == QUEUED:
        job_finish(conn, job_id, now, Outcome(Ending.CANCELLED), states=(QUEUED,))
        outcome = CancelOutcome.ENDED
    elif row.cancel_time is None:
        conn.execute(sa.update(jobs).where(jobs.c.id == job_id).values(cancel_time=now))
        outcome = CancelOutcome.SIGNALLED
    else:
        job_finish(conn, job_id, now, Outcome(Ending.CANCELLED), states=HELD)
        outcome = CancelOutcome.FORCED
    return outcome


# -- read ------------------------------------------------------------------------


def job_get(conn: Connection, job_id: str) -> vs.Job:
    return _message(job_row(conn, job_id))


def job_list(conn: Connection) -> list[vs.Job]:
    query = sa.select(jobs).where(jobs.c.kind == VAGRANT).order_by(jobs.c.id)
    return [_message(r) for r in conn.execute(query)]


def job_queue_position(conn: Connection, job_id: str) -> tuple[int, str]:
    """(1-based position among QUEUED jobs for the same runners, blocking job id)."""
    row = job_row(conn, job_id)
    if row.state != QUEUED:
        return 0, ""
    competing = sa.or_(jobs.c.runner_id.is_(None), jobs.c.runner_id == row.runner_id)
    if row.runner_id is None:
        competing = jobs.c.runner_id.is_(None)
    competing = sa.and_(competing, jobs.c.kind == VAGRANT)
    ahead = conn.execute(
        sa.select(sa.func.count())
        .select_from(jobs)
        .where(
            jobs.c.state == QUEUED,
            competing,
            sa.tuple_(jobs.c.queue_time, jobs.c.id) < sa.tuple_(row.queue_time, row.id),
        )
    ).scalar_one()
    blocker = ""
    if row.scope_key is not None:
        holder = conn.execute(
            sa.select(jobs.c.id).where(jobs.c.scope_key == row.scope_key, jobs.c.state.in_(HELD))
        ).scalar()
        blocker = holder or ""
    return ahead + 1, blocker


def jobs_queued_runner_ids(conn: Connection) -> set[str | None]:
    """Which runners (None: any) have QUEUED work: the cheap poll for wake-ups."""
    rows = conn.execute(
        sa.select(jobs.c.runner_id).where(jobs.c.state == QUEUED, jobs.c.kind == VAGRANT).distinct()
    )
    return set(rows.scalars())


def job_row(conn: Connection, job_id: str, *, lock: bool = False, kind: str = VAGRANT) -> Any:
    """The job's row (attributes named as the columns); NOT_FOUND if none."""
    row = (_ROW_LOCKED if lock else _ROW).one(conn, id=job_id, kind=kind)
    if row is None:
        raise NotFound("job not found")
    return JobRow._make(row)


JobRow = namedtuple("JobRow", [c.name for c in jobs.c])  # type: ignore[misc]
_by_id = sa.select(jobs).where(jobs.c.id == sa.bindparam("id"), jobs.c.kind == sa.bindparam("kind"))
_ROW = Prepared(_by_id)
_ROW_LOCKED = Prepared(_by_id.with_for_update())


def _message(row: Any) -> vs.Job:
    job = vs.Job.FromString(row.data)
    job.state = row.state
    if row.holder_key:
        # As the runner registered it; the lowercased key only matches.
        job.assigned_runner.id = row.holder_id or row.holder_key
    for column in (
        "queue_time",
        "assign_time",
        "ack_time",
        "complete_time",
        "cancel_time",
        "expire_time",
    ):
        value = getattr(row, column)
        if value is not None:
            getattr(job, column).FromMicroseconds(value)
    if row.error is not None:
        job.error.ParseFromString(row.error)
    if row.result is not None:
        job.result.ParseFromString(row.result)
    return job


def jobs_count_by_state(conn: Connection) -> list[tuple[str, str, int]]:
    """(kind, state name, count) of every job in the store, for metrics."""
    rows = conn.execute(
        sa.select(jobs.c.kind, jobs.c.state, sa.func.count()).group_by(jobs.c.kind, jobs.c.state)
    )
    return [(kind, state_name(state), count) for kind, state, count in rows]
