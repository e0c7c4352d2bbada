"""The provisioner side of the job state machine.

Acquisition is the provisioner's assignment: QUEUED -> RUNNING in one
conditional UPDATE (there is no ack step upstream), the holder being the
daemon's id. Ownership is by daemon id, so a daemon that reconnects under the
same id keeps its job. Updates (the heartbeat), completion, failure, hung
jobs, and the logs daemons send.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from waystation import validate
from waystation.core.limits import MAX_MESSAGE_BYTES
from waystation.core.states import FINAL, QUEUED, RUNNING, Ending
from waystation.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.store import jobs as job_tx
from waystation.store import output as output_tx
from waystation.store.daemons import daemon_seen
from waystation.store.lifecycle import Outcome, job_finish, job_take
from waystation.store.prepared import Prepared
from waystation.store.provisioner_queue import (
    KIND,
    TEMPLATE_IMPORT,
    WORKSPACE_BUILD,
    Daemon,
    Logs,
    tag_text,
)
from waystation.store.schema import (
    jobs,
    provisioner_daemons,
    provisioner_job_tags,
    provisioner_jobs,
    template_versions,
    templates,
    workspace_builds,
    workspaces,
)
from waystation.store.templates import variable_values, version_get, version_update


def _candidates(daemon: Daemon) -> Prepared:
    """The oldest pending jobs of a provisioner type the daemon serves whose tags
    it all has; one statement per kind of daemon, kept."""
    key = (tuple(sorted(daemon.provisioners)), tuple(sorted(daemon.tags.items())))
    statement = _CANDIDATES.get(key)
    if statement is None:
        # Equalities rather than IN lists: prepared statements take no lists.
        held = [provisioner_job_tags.c.tag == tag_text(k, v) for k, v in key[1]]
        missing_tag = sa.exists().where(
            provisioner_job_tags.c.job_id == jobs.c.id, ~sa.or_(*held) if held else sa.true()
        )
        serves = sa.or_(*(provisioner_jobs.c.provisioner == p for p in key[0]))
        statement = Prepared(
            sa.select(jobs.c.id)
            .select_from(jobs.join(provisioner_jobs))
            .where(jobs.c.kind == KIND, jobs.c.state == QUEUED, serves, ~missing_tag)
            .order_by(jobs.c.queue_time, jobs.c.id)
            .limit(8)
            .with_for_update(skip_locked=True, of=jobs)
        )
        if len(_CANDIDATES) < 1024:  # daemons come in few kinds; never grow unbounded
            _CANDIDATES[key] = statement
    return statement


_CANDIDATES: dict[tuple[tuple[str, ...], tuple[tuple[str, str], ...]], Prepared] = {}


def job_acquire(
    conn: Connection, daemon: Daemon, now: int, hang: int, lease: int
) -> tuple[pd.AcquiredJob | None, list[str]]:
    """Lock the oldest pending job this daemon may take: now RUNNING, held by it.

    Returns the job (None if none) and the ids of jobs failed on the way
    because their payload would exceed the message limit.
    """
    daemon_seen(conn, daemon, now, lease)
    failed: list[str] = []
    for (job_id,) in _candidates(daemon).all(conn):
        if job_take(conn, job_id, KIND, daemon.id, None, now, now + hang) is None:
            continue
        job = _acquired(conn, job_id)
        size = job.ByteSize()
        if size > MAX_MESSAGE_BYTES - 64 * 1024:
            too_big = f"the job's payload is {size} bytes: more than the 4 MiB message limit"
            job_finish(conn, job_id, now, Outcome.failed(too_big), states=(RUNNING,))
            failed.append(job_id)
            continue
        return job, failed
    return None, failed


def _acquired(conn: Connection, job_id: str) -> pd.AcquiredJob:
    row = _ACQUIRED.one(conn, id=job_id)
    assert row is not None  # locked by the caller
    queue_time, provisioner, owner, payload, archive = row
    job = pd.AcquiredJob.FromString(payload)
    job.job_id = job_id
    job.created_at = queue_time // 1000  # upstream: Unix milliseconds
    job.provisioner = provisioner
    job.user_name = owner
    job.template_source_archive = archive
    return job


_ACQUIRED = Prepared(
    sa.select(
        jobs.c.queue_time,
        provisioner_jobs.c.provisioner,
        provisioner_jobs.c.owner,
        provisioner_jobs.c.input,
        template_versions.c.archive,
    )
    .select_from(
        jobs.join(provisioner_jobs).join(
            template_versions,
            template_versions.c.id == provisioner_jobs.c.template_version_id,
        )
    )
    .where(jobs.c.id == sa.bindparam("id"))
)


def job_owned(conn: Connection, job_id: str, daemon_id: str) -> Any:
    """The job, locked, if this daemon holds it and it has not ended; upstream's
    messages otherwise."""
    validate.required("job", "job_id", job_id)
    row = job_tx.job_row(conn, job_id, lock=True, kind=KIND)
    if row.holder_key is None:
        raise FailedPrecondition("job isn't running yet")
    if row.holder_key != daemon_id:
        raise PermissionDenied("you don't own this job")
    if row.state in FINAL:
        raise FailedPrecondition("job already completed")
    return row


def job_touch(conn: Connection, job_id: str, daemon_id: str, now: int, hang: int) -> None:
    _TOUCH_JOB.run(conn, id=job_id, deadline=now + hang)
    _TOUCH_PROVISIONER_JOB.run(conn, id=job_id, now=now)
    # The daemon is online while its job lives.
    _TOUCH_DAEMON.run(conn, id=daemon_id, now=now, until=now + hang)


_TOUCH_JOB = Prepared(
    sa.update(jobs)
    .where(jobs.c.id == sa.bindparam("id"), jobs.c.state == RUNNING)
    .values(liveness_deadline=sa.bindparam("deadline"))
)
_TOUCH_PROVISIONER_JOB = Prepared(
    sa.update(provisioner_jobs)
    .where(provisioner_jobs.c.job_id == sa.bindparam("id"))
    .values(updated_at=sa.bindparam("now"))
)
_TOUCH_DAEMON = Prepared(
    sa.update(provisioner_daemons)
    .where(provisioner_daemons.c.id == sa.bindparam("id"))
    .values(last_seen=sa.bindparam("now"), online_until=sa.bindparam("until"))
)


@dataclass
class Updated:
    response: pd.UpdateJobResponse
    logged: bool  # logs were appended
    error: str | None = None  # to raise (FailedPrecondition) after the commit


def job_update(
    conn: Connection, daemon_id: str, request: pd.UpdateJobRequest, now: int, hang: int
) -> Updated:
    """The daemon's heartbeat, logs and import findings. Logs and findings are
    kept even when the answer is an error (missing variable values)."""
    row = job_owned(conn, request.job_id, daemon_id)
    job_touch(conn, row.id, daemon_id, now, hang)
    if request.logs:
        output_append_logs(conn, row.id, list(request.logs))
    result = Updated(pd.UpdateJobResponse(canceled=row.cancel_time is not None), bool(request.logs))
    has_findings = request.readme or request.template_variables or request.user_variable_values
    if row.operation == TEMPLATE_IMPORT and has_findings:
        version = _job_version(conn, row.id)
        if request.readme:
            version.readme = request.readme
        if request.user_variable_values:
            del version.user_variable_values[:]
            version.user_variable_values.extend(request.user_variable_values)
        if request.template_variables:
            del version.template_variables[:]
            version.template_variables.extend(request.template_variables)
            values, missing = variable_values(version)
            if missing:
                result.error = f"required template variables need values: {', '.join(missing)}"
            else:
                result.response.variable_values.extend(values)
        version_update(conn, version)
    return result


def _job_version(conn: Connection, job_id: str) -> pv.TemplateVersion:
    version_id = conn.execute(
        sa.select(provisioner_jobs.c.template_version_id).where(provisioner_jobs.c.job_id == job_id)
    ).scalar_one()
    return version_get(conn, version_id)


def job_complete(conn: Connection, daemon_id: str, completed: pd.CompletedJob, now: int) -> None:
    row = job_owned(conn, completed.job_id, daemon_id)
    which = completed.WhichOneof("type")
    if which is None:
        raise InvalidArgument("type payload must be provided")
    if which != row.operation:
        raise InvalidArgument(f"type payload is {which}, but the job is a {row.operation}")
    if which == TEMPLATE_IMPORT:
        found = completed.template_import
        version = _job_version(conn, row.id)
        for name in ("start_resources", "stop_resources", "rich_parameters"):
            target = getattr(version, name)
            del target[:]
            target.extend(getattr(found, name))
        version_update(conn, version)
        conn.execute(
            sa.update(templates)
            .where(templates.c.id == version.template_id)
            .values(active_version_id=version.id)
        )
    elif which == WORKSPACE_BUILD:
        _build_done(
            conn, row.id, completed.workspace_build.state, completed.workspace_build.resources, now
        )
    result = completed.SerializeToString(deterministic=True)
    job_finish(conn, row.id, now, Outcome(Ending.COMPLETED, result=result), states=_ENDABLE)


def _build_done(
    conn: Connection, job_id: str, state: bytes, resources: Iterable[sdk.Resource] | None, now: int
) -> None:
    build = conn.execute(
        sa.select(workspace_builds).where(workspace_builds.c.job_id == job_id)
    ).one()
    values: dict[str, object] = {"state": state or None}
    if resources is not None:
        message = pv.WorkspaceBuild.FromString(build.data)
        message.resources.extend(resources)
        values["data"] = message.SerializeToString(deterministic=True)
        if build.transition == sdk.DESTROY:
            conn.execute(
                sa.update(workspaces)
                .where(workspaces.c.id == build.workspace_id)
                .values(deleted_at=now)
            )
    conn.execute(
        sa.update(workspace_builds).where(workspace_builds.c.id == build.id).values(values)
    )


def job_fail(conn: Connection, daemon_id: str, failed: pd.FailedJob, now: int) -> None:
    """The job fails with the daemon's error and error code. Unlike CompleteJob the
    type is optional (upstream switches on it with no default): Coder's daemon
    sends none for import and dry-run failures, setup and transport failures,
    cancel time-outs and shutdowns. Untyped, nothing type-specific is stored: a
    build keeps the state it started from, as a typed failure without state does."""
    row = job_owned(conn, failed.job_id, daemon_id)
    which = failed.WhichOneof("type")
    if which is not None and which != row.operation:
        raise InvalidArgument(f"type payload is {which}, but the job is a {row.operation}")
    if which == WORKSPACE_BUILD and failed.workspace_build.state:
        _build_done(conn, row.id, failed.workspace_build.state, None, now)  # partial state
    outcome = Outcome.failed(failed.error or "failed", failed.error_code)
    job_finish(conn, row.id, now, outcome, states=_ENDABLE)


# A provisioner job ends from QUEUED or RUNNING (it is never WAITING).
_ENDABLE = (QUEUED, RUNNING)


def jobs_fail_hung(conn: Connection, job_ids: Iterable[str], now: int, hang: float) -> list[str]:
    """RUNNING provisioner jobs past their hang deadline: failed, with a log line
    saying why (part of the timer transaction, store.job_timers)."""
    ended = []
    span = f"{hang / 60:g} minutes" if hang >= 120 else f"{hang:g} seconds"
    for job_id in job_ids:
        row = conn.execute(
            sa.select(jobs.c.holder_key)
            .where(
                jobs.c.id == job_id,
                jobs.c.state == RUNNING,
                jobs.c.liveness_deadline <= now,
            )
            .with_for_update()  # an UpdateJob appending logs meanwhile waits for us
        ).first()
        if row is None:
            continue
        why = (
            f"no update from provisioner daemon {row.holder_key} for {span}:"
            " the job is considered hung and has been failed"
        )
        output_append_logs(
            conn,
            job_id,
            [
                pd.Log(
                    source=pd.PROVISIONER_DAEMON,
                    level=sdk.ERROR,
                    created_at=now // 1000,
                    stage="Hang detector",
                    output=why,
                )
            ],
        )
        job_finish(conn, job_id, now, Outcome.failed(why, "HUNG", Ending.HUNG), states=(RUNNING,))
        ended.append(job_id)
    return ended


def connection_broken(conn: Connection, job_id: str, daemon_id: str, now: int) -> bool:
    """An acquired job whose daemon's stream broke before it was sent: failed (upstream)."""
    row = conn.execute(
        sa.select(jobs.c.state).where(
            jobs.c.id == job_id, jobs.c.state == RUNNING, jobs.c.holder_key == daemon_id
        )
    ).first()
    if row is None:
        return False
    broken = Outcome.failed("connection to provisioner daemon broken", ending=Ending.BROKEN)
    job_finish(conn, job_id, now, broken, states=(RUNNING,))
    return True


# -- logs ------------------------------------------------------------------------------


def output_append_logs(conn: Connection, job_id: str, logs: list[pd.Log]) -> None:
    """One batch of log lines; the job row is locked by the caller, so seq is ours."""
    seq = output_tx.output_next_seq(conn, job_id)
    output_tx.output_append(conn, job_id, seq, [Logs(logs=logs).SerializeToString()])
