"""Provisioner jobs as people see them: status, queue position and why
nobody takes them; what is queued, for the engine's wake-ups."""

from __future__ import annotations

import json

import sqlalchemy as sa
from google.rpc import status_pb2
from sqlalchemy.engine import Connection, Row

from waystation.core.states import QUEUED, RUNNING, SUCCESS
from waystation.errors import NotFound
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.store.daemons import daemons_list_rows, tags_text
from waystation.store.provisioner_queue import JOB_TYPES, KIND, TEMPLATE_DRY_RUN, Job
from waystation.store.runners import in_slices
from waystation.store.schema import jobs, provisioner_jobs, workspace_builds

# -- reading jobs --------------------------------------------------------------------


def _job_query() -> sa.Select[tuple[object, ...]]:
    return sa.select(
        jobs,
        provisioner_jobs.c.provisioner,
        provisioner_jobs.c.tags,
        provisioner_jobs.c.owner,
        provisioner_jobs.c.template_version_id,
        provisioner_jobs.c.workspace_build_id,
        provisioner_jobs.c.error_code,
        workspace_builds.c.workspace_id,
    ).select_from(
        jobs.join(provisioner_jobs).outerjoin(
            workspace_builds, workspace_builds.c.id == provisioner_jobs.c.workspace_build_id
        )
    )


def job_get(conn: Connection, job_id: str) -> Job:
    row = conn.execute(_job_query().where(jobs.c.id == job_id)).first()
    if row is None:
        raise NotFound("provisioner job not found")
    return _job_message(row)


def jobs_by_id(conn: Connection, job_ids: list[str]) -> dict[str, Job]:
    found: dict[str, Job] = {}
    for chunk in in_slices(job_ids):
        found.update(
            (r.id, _job_message(r)) for r in conn.execute(_job_query().where(jobs.c.id.in_(chunk)))
        )
    return found


def _job_message(row: Row[tuple[object, ...]]) -> Job:
    job = Job(
        id=row.id,
        type=JOB_TYPES.get(row.operation, Job.TYPE_UNSPECIFIED),
        status=_status(row),
        provisioner=row.provisioner,
        tags=json.loads(row.tags),
        daemon_id=row.holder_key or "",
        error_code=row.error_code or "",
        template_version_id=row.template_version_id,
        workspace_build_id=row.workspace_build_id or "",
        workspace_id=row.workspace_id or "",
        owner=row.owner,
    )
    for column, name in (
        ("queue_time", "created_at"),
        ("assign_time", "started_at"),
        ("complete_time", "completed_at"),
        ("cancel_time", "canceled_at"),
    ):
        value = getattr(row, column)
        if value is not None:
            getattr(job, name).FromMicroseconds(value)
    if row.error is not None:
        job.error = status_pb2.Status.FromString(row.error).message
    if row.operation == TEMPLATE_DRY_RUN and row.result is not None:
        job.dry_run_resources.extend(
            pd.CompletedJob.FromString(row.result).template_dry_run.resources
        )
    return job


def _status(row: Row[tuple[object, ...]]) -> Job.Status.ValueType:
    canceled = row.cancel_time is not None
    if row.state == QUEUED:
        return Job.PENDING
    if row.state == RUNNING:
        return Job.CANCELING if canceled else Job.RUNNING
    if row.state == SUCCESS:
        return Job.SUCCEEDED
    return Job.CANCELED if canceled else Job.FAILED


def job_view(conn: Connection, job_id: str, now: int) -> Job:
    """A job, with its place in the queue when pending."""
    job = job_get(conn, job_id)
    if job.status == Job.PENDING:
        _place_in_queue(conn, [job], now)
    return job


def job_list(conn: Connection, pending_only: bool, limit: int, now: int) -> list[Job]:
    query = _job_query().order_by(jobs.c.queue_time.desc(), jobs.c.id.desc()).limit(limit)
    if pending_only:
        query = query.where(jobs.c.state == QUEUED)
    rows = list(reversed(conn.execute(query).all()))
    result = [_job_message(r) for r in rows]
    _place_in_queue(conn, [j for j in result if j.status == Job.PENDING], now)
    return result


def _place_in_queue(conn: Connection, wanted: list[Job], now: int) -> None:
    """Queue position among the pending jobs the able daemons could take, or why none can."""
    if not wanted:
        return
    pending = conn.execute(
        sa.select(jobs.c.id, provisioner_jobs.c.provisioner, provisioner_jobs.c.tags)
        .select_from(jobs.join(provisioner_jobs))
        .where(jobs.c.kind == KIND, jobs.c.state == QUEUED)
        .order_by(jobs.c.queue_time, jobs.c.id)
    ).all()
    daemons = [d for d, online, _ in daemons_list_rows(conn, now) if online]
    order = [(r.id, r.provisioner, json.loads(r.tags)) for r in pending]
    for job in wanted:
        able = [d for d in daemons if d.fits(job.provisioner, job.tags)]
        if not able:
            job.pending_reason = (
                f"no connected daemon serves provisioner {job.provisioner} with tags "
                f"{tags_text(job.tags)}"
            )
            continue
        takeable = [jid for jid, p, t in order if any(d.fits(p, t) for d in able)]
        job.queue_size = len(takeable)
        job.queue_position = takeable.index(job.id) + 1 if job.id in takeable else 0


def jobs_queued_kinds(conn: Connection) -> list[tuple[str, dict[str, str]]]:
    """(provisioner, tags) of every pending job: the poll that wakes daemons."""
    rows = conn.execute(
        sa.select(provisioner_jobs.c.provisioner, provisioner_jobs.c.tags)
        .select_from(jobs.join(provisioner_jobs))
        .where(jobs.c.kind == KIND, jobs.c.state == QUEUED)
        .distinct()
    ).all()
    return [(r.provisioner, json.loads(r.tags)) for r in rows]
