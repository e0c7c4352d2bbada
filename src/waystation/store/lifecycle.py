"""The transitions every kind of job shares: taken, and finished.

A runner or a daemon takes a QUEUED job with one statement whose kind says
what follows: a runner's job waits for its ack (WAITING, the ack deadline), a
daemon's runs at once (RUNNING, the liveness deadline: its hang timeout).

Completion, failure, cancel, expiry, the heartbeat timeout, the hang timeout
and a broken daemon connection all end a job here, with an Outcome: one
UPDATE, which clears every deadline and writes the ending's state, error and
result. Both are prepared statements (store.prepared): the hot path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from google.rpc import code_pb2, status_pb2
from sqlalchemy.engine import Connection

from waystation.core.states import (
    ERROR,
    QUEUED,
    RUNNING,
    SUCCESS,
    VAGRANT,
    WAITING,
    Ending,
    cancelled_status,
)
from waystation.store.prepared import Prepared
from waystation.store.schema import jobs, provisioner_jobs


def job_take(
    conn: Connection,
    job_id: str,
    kind: str,
    holder_key: str,
    holder_id: str | None,
    now: int,
    deadline: int,
) -> tuple[Any, ...] | None:
    """QUEUED -> held by `holder_key`: a runner's job WAITING for its ack by
    `deadline`, a daemon's RUNNING with `deadline` its liveness deadline. The
    taken row, or None if it was no longer QUEUED."""
    acked = kind != VAGRANT  # daemons have no ack step (upstream)
    return _TAKE.one(
        conn,
        id=job_id,
        kind=kind,
        new_state=RUNNING if acked else WAITING,
        holder=holder_key,
        registered=holder_id,
        now=now,
        acked=now if acked else None,
        ack_deadline=None if acked else deadline,
        liveness_deadline=deadline if acked else None,
    )


_TAKE = Prepared(
    sa.update(jobs)
    .where(
        jobs.c.id == sa.bindparam("id"),
        jobs.c.state == QUEUED,
        jobs.c.kind == sa.bindparam("kind"),
    )
    .values(
        state=sa.bindparam("new_state"),
        holder_key=sa.bindparam("holder"),
        holder_id=sa.bindparam("registered"),
        assign_time=sa.bindparam("now"),
        ack_time=sa.bindparam("acked"),
        ack_deadline=sa.bindparam("ack_deadline"),
        liveness_deadline=sa.bindparam("liveness_deadline"),
    )
    .returning(*jobs.c)
)


# Endings that count as a cancel: the job's cancel_time is set if it was not.
_CANCELS = frozenset({Ending.CANCELLED, Ending.EXPIRED, Ending.TIMED_OUT})


@dataclass(frozen=True)
class Outcome:
    """How a job ended and what it leaves: a result, an error, an error code."""

    ending: Ending
    result: bytes | None = None  # the serialized result, as the front end sent it
    error: status_pb2.Status | None = None  # None: the ending's own (if it fails)
    error_code: str = ""  # provisioner jobs: upstream's error code (HUNG, ...)

    @staticmethod
    def failed(message: str, error_code: str = "", ending: Ending = Ending.FAILED) -> Outcome:
        """A failure told in words (provisioner jobs: upstream keeps a string)."""
        status = status_pb2.Status(code=code_pb2.UNKNOWN, message=message)
        return Outcome(ending, error=status, error_code=error_code)


def job_finish(
    conn: Connection,
    job_id: str,
    now: int,
    outcome: Outcome,
    *,
    states: tuple[int, ...],
    holder_key: str | None = None,
    kind: str | None = None,
) -> tuple[Any, ...] | None:
    """End the job if it is in `states` (and held by `holder_key`, of `kind`,
    when given): the ended row, or None if it was not there to end."""
    error = outcome.error
    if error is None and outcome.ending in _CANCELS:
        error = cancelled_status()  # upstream's exact error for these
    state = SUCCESS if outcome.ending is Ending.COMPLETED and error is None else ERROR
    row = _FINISH[holder_key is not None, kind is not None].one(
        conn,
        id=job_id,
        lo=min(states),
        hi=max(states),
        holder=holder_key,
        kind=kind,
        new_state=state,
        now=now,
        cancelled=now if outcome.ending in _CANCELS else None,
        new_error=error.SerializeToString() if error is not None else None,
        new_result=outcome.result,
    )
    if row is not None and outcome.error_code:
        conn.execute(
            sa.update(provisioner_jobs)
            .where(provisioner_jobs.c.job_id == job_id)
            .values(error_code=outcome.error_code)
        )
    return row


def _build(by_holder: bool, by_kind: bool) -> Prepared:
    # `states` is a range: every set a caller ends from is contiguous in JobState.
    where = [
        jobs.c.id == sa.bindparam("id"),
        jobs.c.state >= sa.bindparam("lo"),
        jobs.c.state <= sa.bindparam("hi"),
    ]
    if by_holder:
        where.append(jobs.c.holder_key == sa.bindparam("holder"))
    if by_kind:
        where.append(jobs.c.kind == sa.bindparam("kind"))
    return Prepared(
        sa.update(jobs)
        .where(*where)
        .values(
            state=sa.bindparam("new_state"),
            complete_time=sa.bindparam("now"),
            cancel_time=sa.func.coalesce(jobs.c.cancel_time, sa.bindparam("cancelled")),
            ack_deadline=None,
            liveness_deadline=None,
            error=sa.bindparam("new_error"),
            result=sa.bindparam("new_result"),
        )
        .returning(*jobs.c)
    )


_FINISH = {(h, k): _build(h, k) for h in (False, True) for k in (False, True)}
