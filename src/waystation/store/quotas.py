"""Quotas: a user's daily cost allowance, and the CommitQuota check a
workspace build makes against it."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from waystation import validate
from waystation.errors import FailedPrecondition, InvalidArgument
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.store.provisioner_jobs import job_owned, job_touch
from waystation.store.provisioner_queue import WORKSPACE_BUILD
from waystation.store.schema import quotas, workspace_builds, workspaces


def quota_set(conn: Connection, user: str, allowance: int | None) -> pv.Quota:
    validate.name("quota", user, field="user")
    conn.execute(sa.delete(quotas).where(quotas.c.user == user))
    if allowance is not None:
        if allowance < 0:
            raise InvalidArgument("quota allowance must be 0 or more")
        conn.execute(sa.insert(quotas).values(user=user, allowance=allowance))
    return quota_get(conn, user)


def quota_get(conn: Connection, user: str) -> pv.Quota:
    validate.name("quota", user, field="user")
    allowance = conn.execute(sa.select(quotas.c.allowance).where(quotas.c.user == user)).scalar()
    return pv.Quota(
        user=user,
        configured=allowance is not None,
        allowance=allowance if allowance is not None else -1,
        consumed=_consumed(conn, user),
    )


def _consumed(conn: Connection, owner: str) -> int:
    """Daily cost of the owner's live workspaces: each one's latest build's."""
    later = workspace_builds.alias("later")
    latest = ~sa.exists().where(
        later.c.workspace_id == workspace_builds.c.workspace_id,
        later.c.build_number > workspace_builds.c.build_number,
    )
    total = conn.execute(
        sa.select(sa.func.coalesce(sa.func.sum(workspace_builds.c.daily_cost), 0))
        .select_from(workspace_builds.join(workspaces))
        .where(workspaces.c.owner == owner, workspaces.c.deleted_at.is_(None), latest)
    ).scalar_one()
    return int(total)


def commit_quota(
    conn: Connection, daemon_id: str, request: pd.CommitQuotaRequest, now: int, hang: int
) -> pd.CommitQuotaResponse:
    row = job_owned(conn, request.job_id, daemon_id)
    job_touch(conn, row.id, daemon_id, now, hang)
    if row.operation != WORKSPACE_BUILD:
        raise FailedPrecondition("quota is committed for workspace builds only")
    if request.daily_cost < 0:
        raise InvalidArgument("daily_cost must be 0 or more")
    build = conn.execute(
        sa.select(workspace_builds).where(workspace_builds.c.job_id == row.id)
    ).one()
    owner = conn.execute(
        sa.select(workspaces.c.owner).where(workspaces.c.id == build.workspace_id)
    ).scalar_one()
    # Serialize commits of one owner, so two builds cannot both fit the last credits.
    conn.execute(sa.select(workspaces.c.id).where(workspaces.c.owner == owner).with_for_update())
    previous_cost = (
        conn.execute(
            sa.select(workspace_builds.c.daily_cost).where(
                workspace_builds.c.workspace_id == build.workspace_id,
                workspace_builds.c.build_number == build.build_number - 1,
            )
        ).scalar()
        or 0
    )
    # This build is its workspace's latest: leave out what it committed before.
    consumed = _consumed(conn, owner) - build.daily_cost
    total = consumed + request.daily_cost
    allowance = conn.execute(sa.select(quotas.c.allowance).where(quotas.c.user == owner)).scalar()
    if allowance is not None and total > allowance and request.daily_cost > previous_cost:
        return pd.CommitQuotaResponse(ok=False, credits_consumed=consumed, budget=allowance)
    conn.execute(
        sa.update(workspace_builds)
        .where(workspace_builds.c.id == build.id)
        .values(daily_cost=request.daily_cost)
    )
    return pd.CommitQuotaResponse(
        ok=True, credits_consumed=total, budget=allowance if allowance is not None else -1
    )
