"""Job timers and pruning: every due deadline of every kind (expiry, ack,
heartbeat, hang) fired in one transaction (after a restart too), and finished
runner jobs pruned."""

from __future__ import annotations

from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from waystation.core.states import FINAL, PROVISIONER, QUEUED, RUNNING, VAGRANT, WAITING, Ending
from waystation.store.jobs import REQUEUE
from waystation.store.lifecycle import Outcome, job_finish
from waystation.store.provisioner_jobs import jobs_fail_hung
from waystation.store.schema import job_output, jobs


@dataclass(frozen=True)
class Fired:
    expired: list[str]  # QUEUED or WAITING past expire_time: now ERROR
    requeued: list[str]  # WAITING past the ack deadline: QUEUED again
    timed_out: list[str]  # RUNNING past the heartbeat deadline: ERROR
    hung: list[str]  # provisioner jobs past their hang deadline: failed, the reason logged

    def __bool__(self) -> bool:
        return bool(self.expired or self.requeued or self.timed_out or self.hung)


def jobs_fire_timers(conn: Connection, now: int, hang: float) -> Fired:
    """Every due deadline; `hang` (seconds) is the hang timeout, for its log line."""

    def due(column: sa.Column[int], states: tuple[int, ...], kind: str = VAGRANT) -> list[str]:
        return list(
            conn.execute(
                sa.select(jobs.c.id)
                .where(column <= now, jobs.c.state.in_(states), jobs.c.kind == kind)
                .with_for_update(skip_locked=True)
            ).scalars()
        )

    expired = [
        j
        for j in due(jobs.c.expire_time, (QUEUED, WAITING))
        if job_finish(conn, j, now, Outcome(Ending.EXPIRED), states=(QUEUED, WAITING))
    ]
    requeued = []
    for job_id in due(jobs.c.ack_deadline, (WAITING,)):
        if conn.execute(
            sa.update(jobs).where(jobs.c.id == job_id, jobs.c.state == WAITING).values(REQUEUE)
        ).rowcount:
            requeued.append(job_id)
    timed_out = [
        j
        for j in due(jobs.c.liveness_deadline, (RUNNING,))
        if job_finish(conn, j, now, Outcome(Ending.TIMED_OUT), states=(RUNNING,))
    ]
    hung = jobs_fail_hung(conn, due(jobs.c.liveness_deadline, (RUNNING,), PROVISIONER), now, hang)
    return Fired(expired, requeued, timed_out, hung)


def jobs_next_deadline(conn: Connection) -> int | None:
    """The earliest moment a timer is due, or None if no timer is armed."""
    candidates = [
        conn.execute(
            sa.select(sa.func.min(jobs.c.expire_time)).where(jobs.c.state.in_((QUEUED, WAITING)))
        ).scalar(),
        conn.execute(
            sa.select(sa.func.min(jobs.c.ack_deadline)).where(jobs.c.state == WAITING)
        ).scalar(),
        conn.execute(
            sa.select(sa.func.min(jobs.c.liveness_deadline)).where(jobs.c.state == RUNNING)
        ).scalar(),
    ]
    present = [c for c in candidates if c is not None]
    return min(present) if present else None


# -- prune -----------------------------------------------------------------------


def jobs_prune(conn: Connection, keep: int) -> int:
    """Delete all but the newest `keep` finished runner jobs (and their output).

    Provisioner jobs stay: template versions and workspace builds point at them.
    """
    finished = sa.and_(jobs.c.kind == VAGRANT, jobs.c.state.in_(FINAL))
    newest = (
        sa.select(jobs.c.id)
        .where(finished)
        .order_by(jobs.c.complete_time.desc(), jobs.c.id.desc())
        .limit(keep)
    )
    doomed = sa.select(jobs.c.id).where(finished, jobs.c.id.not_in(newest))
    conn.execute(sa.delete(job_output).where(job_output.c.job_id.in_(doomed)))
    return conn.execute(sa.delete(jobs).where(finished, jobs.c.id.not_in(newest))).rowcount
