"""Provisioner jobs: their kinds, tags, the daemon as it introduces itself,
and queueing one (the insert every template push, build and dry run shares).

A provisioner job is a `jobs` row of kind "provisioner" (the engine's states,
times, holder and timers, exactly as for runner jobs) plus a
`provisioner_jobs` row with what only daemons need.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from waystation import validate
from waystation.core.states import PROVISIONER, QUEUED
from waystation.errors import InvalidArgument
from waystation.ids import new_id
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.store.schema import jobs, provisioner_job_tags, provisioner_jobs

KIND = PROVISIONER  # jobs.kind of these jobs
TEMPLATE_IMPORT = "template_import"
WORKSPACE_BUILD = "workspace_build"
TEMPLATE_DRY_RUN = "template_dry_run"
JOB_TYPES = {
    TEMPLATE_IMPORT: pv.ProvisionerJob.TEMPLATE_IMPORT,
    WORKSPACE_BUILD: pv.ProvisionerJob.WORKSPACE_BUILD,
    TEMPLATE_DRY_RUN: pv.ProvisionerJob.TEMPLATE_DRY_RUN,
}
Job = pv.ProvisionerJob
Logs = pv.WatchProvisionerJobResponse.Logs


@dataclass(frozen=True)
class Daemon:
    """A provisioner daemon as it introduced itself (gRPC metadata)."""

    id: str
    provisioners: tuple[str, ...]
    tags: Mapping[str, str] = field(default_factory=dict)

    def fits(self, provisioner: str, tags: Mapping[str, str]) -> bool:
        return provisioner in self.provisioners and all(
            self.tags.get(k) == v for k, v in tags.items()
        )


@dataclass(frozen=True)
class Queued:
    """A provisioner job just queued: what the engine needs to wake a daemon."""

    job_id: str
    provisioner: str
    tags: Mapping[str, str]


def tags_json(tags: Mapping[str, str]) -> str:
    return json.dumps(dict(sorted(tags.items())), separators=(",", ":"))


def tag_text(key: str, value: str) -> str:
    return json.dumps([key, value], separators=(",", ":"))


def check_tags(tags: Mapping[str, str]) -> dict[str, str]:
    for key, value in tags.items():
        validate.name("tag", key, field="key")
        if len(value) > validate.MAX_NAME:
            raise InvalidArgument(f"tag {key} value is too long")
    return dict(tags)


# -- queueing ----------------------------------------------------------------------


def queue_job(
    conn: Connection,
    job_type: str,
    provisioner: str,
    tags: Mapping[str, str],
    owner: str,
    version_id: str,
    build_id: str | None,
    payload: pd.AcquiredJob,
    now: int,
    job_id: str | None = None,
) -> Queued:
    job_id = job_id or new_id()
    conn.execute(
        sa.insert(jobs).values(
            id=job_id, kind=KIND, state=QUEUED, operation=job_type, queue_time=now, data=b""
        )
    )
    conn.execute(
        sa.insert(provisioner_jobs).values(
            job_id=job_id,
            provisioner=provisioner,
            tags=tags_json(tags),
            owner=owner,
            template_version_id=version_id,
            workspace_build_id=build_id,
            input=payload.SerializeToString(deterministic=True),
        )
    )
    if tags:
        conn.execute(
            sa.insert(provisioner_job_tags),
            [{"job_id": job_id, "tag": tag_text(k, v)} for k, v in tags.items()],
        )
    return Queued(job_id, provisioner, dict(tags))
