"""Workspaces and their builds: create, build (START, STOP, DESTROY, each
queued as a provisioner job), and read them with their latest builds."""

from __future__ import annotations

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from waystation import validate
from waystation.core.states import FINAL
from waystation.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from waystation.ids import new_id
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.store.provisioner_queue import WORKSPACE_BUILD, Queued, queue_job
from waystation.store.provisioner_views import jobs_by_id
from waystation.store.runners import in_slices
from waystation.store.schema import jobs, templates, workspace_builds, workspaces
from waystation.store.templates import (
    merge_parameters,
    variable_values,
    version_get,
    version_resolve,
)


def workspace_create(
    conn: Connection, request: pv.CreateWorkspaceRequest, now: int
) -> tuple[pv.Workspace, pv.WorkspaceBuild, Queued]:
    name = validate.name("workspace", request.name)
    owner = validate.name("workspace", request.owner, field="owner")
    version_id = version_resolve(conn, request.template)
    version = version_get(conn, version_id)
    workspace_id = new_id()
    try:
        with conn.begin_nested():
            conn.execute(
                sa.insert(workspaces).values(
                    id=workspace_id,
                    name=name,
                    name_key=name.lower(),
                    owner=owner,
                    template_id=version.template_id,
                    created_at=now,
                )
            )
    except sa.exc.IntegrityError:
        raise AlreadyExists(f"{owner} already has a workspace named {name}") from None
    build = pv.BuildWorkspaceRequest(
        workspace=pv.WorkspaceRef(id=workspace_id),
        transition=sdk.START,
        rich_parameter_values=request.rich_parameter_values,
        template_version_id=version_id,
    )
    return workspace_build(conn, build, now)


def _workspace_row(conn: Connection, ref: pv.WorkspaceRef) -> Row[tuple[object, ...]]:
    if ref.id:
        row = conn.execute(sa.select(workspaces).where(workspaces.c.id == ref.id)).first()
    else:
        validate.required("workspace", "name", ref.name)
        validate.required("workspace", "owner", ref.owner)
        row = conn.execute(
            sa.select(workspaces).where(
                workspaces.c.owner == ref.owner,
                workspaces.c.name_key == ref.name.lower(),
                workspaces.c.deleted_at.is_(None),
            )
        ).first()
    if row is None:
        raise NotFound("workspace not found")
    return row


def workspace_build(
    conn: Connection, request: pv.BuildWorkspaceRequest, now: int
) -> tuple[pv.Workspace, pv.WorkspaceBuild, Queued]:
    """Queue a build; one build at a time per workspace, so the previous
    build's state is final when this one copies it."""
    if request.transition not in sdk.WorkspaceTransition.values():
        raise InvalidArgument(f"unknown workspace transition {request.transition}")
    row = _workspace_row(conn, request.workspace)
    conn.execute(sa.select(workspaces.c.id).where(workspaces.c.id == row.id).with_for_update())
    if row.deleted_at is not None:
        raise FailedPrecondition(f"workspace {row.name} is deleted")
    previous = _latest_build_rows(conn, [row.id]).get(row.id)
    if previous is not None:
        state = conn.execute(sa.select(jobs.c.state).where(jobs.c.id == previous.job_id)).scalar()
        if state not in FINAL:
            raise FailedPrecondition(
                f"workspace {row.name} has a build pending or running (job {previous.job_id}):"
                " wait for it or cancel it"
            )
    if request.template_version_id:
        version_id = version_resolve(conn, request.template_version_id)
    elif request.transition == sdk.START or previous is None:
        version_id = version_resolve(conn, _template_name(conn, row.template_id))
    else:
        version_id = previous.template_version_id
    version = version_get(conn, version_id)
    if version.template_id != row.template_id:
        raise FailedPrecondition("the template version belongs to another template")
    before: list[sdk.RichParameterValue] = []
    if previous is not None:
        before = list(pv.WorkspaceBuild.FromString(previous.data).rich_parameter_values)
    parameters = merge_parameters(version, before, request.rich_parameter_values)
    number = (previous.build_number if previous is not None else 0) + 1
    build_id = new_id()
    job_id = new_id()
    build = pv.WorkspaceBuild(
        id=build_id,
        workspace_id=row.id,
        build_number=number,
        transition=request.transition,
        template_version_id=version_id,
        rich_parameter_values=parameters,
        job_id=job_id,
    )
    build.created_at.FromMicroseconds(now)
    state = previous.state if previous is not None and previous.state else b""
    conn.execute(
        sa.insert(workspace_builds).values(
            id=build_id,
            workspace_id=row.id,
            build_number=number,
            transition=request.transition,
            template_version_id=version_id,
            job_id=job_id,
            created_at=now,
            state=state or None,
            data=build.SerializeToString(deterministic=True),
        )
    )
    values, _ = variable_values(version)
    payload = pd.AcquiredJob(
        workspace_build=pd.AcquiredJob.WorkspaceBuild(
            workspace_build_id=build_id,
            workspace_name=row.name,
            rich_parameter_values=parameters,
            variable_values=values,
            metadata=sdk.Metadata(
                workspace_transition=request.transition,
                workspace_name=row.name,
                workspace_owner=row.owner,
                workspace_owner_name=row.owner,
                workspace_id=row.id,
                template_id=version.template_id,
                template_name=version.template_name,
                template_version=version.name,
                workspace_build_id=build_id,
            ),
            state=state,
        )
    )
    queued = queue_job(
        conn,
        WORKSPACE_BUILD,
        version.provisioner,
        version.tags,
        row.owner,
        version_id,
        build_id,
        payload,
        now,
        job_id,
    )
    return workspace_get(conn, row.id), build_get(conn, build_id), queued


def _template_name(conn: Connection, template_id: str) -> str:
    return str(
        conn.execute(sa.select(templates.c.name).where(templates.c.id == template_id)).scalar()
    )


def _latest_build_rows(
    conn: Connection, workspace_ids: list[str]
) -> dict[str, Row[tuple[object, ...]]]:
    """Each workspace's newest build (workspaces without one are absent)."""
    found: dict[str, Row[tuple[object, ...]]] = {}
    for chunk in in_slices(workspace_ids):
        newest = (
            sa.select(
                workspace_builds.c.workspace_id,
                sa.func.max(workspace_builds.c.build_number).label("build_number"),
            )
            .where(workspace_builds.c.workspace_id.in_(chunk))
            .group_by(workspace_builds.c.workspace_id)
            .subquery()
        )
        query = sa.select(workspace_builds).join(
            newest,
            sa.and_(
                workspace_builds.c.workspace_id == newest.c.workspace_id,
                workspace_builds.c.build_number == newest.c.build_number,
            ),
        )
        found.update((row.workspace_id, row) for row in conn.execute(query))
    return found


def _build_message(conn: Connection, row: Row[tuple[object, ...]]) -> pv.WorkspaceBuild:
    return _build_messages(conn, [row])[0]


def _build_messages(
    conn: Connection, rows: list[Row[tuple[object, ...]]]
) -> list[pv.WorkspaceBuild]:
    """Builds with their jobs, in one query for all the jobs."""
    found = jobs_by_id(conn, [row.job_id for row in rows])
    builds = []
    for row in rows:
        build = pv.WorkspaceBuild.FromString(row.data)
        build.daily_cost = row.daily_cost
        build.state_size = len(row.state or b"")
        build.job.CopyFrom(found[row.job_id])
        builds.append(build)
    return builds


def build_get(conn: Connection, build_id: str) -> pv.WorkspaceBuild:
    row = conn.execute(sa.select(workspace_builds).where(workspace_builds.c.id == build_id)).first()
    if row is None:
        raise NotFound("workspace build not found")
    return _build_message(conn, row)


def _workspace_messages(
    conn: Connection, rows: list[Row[tuple[object, ...]]]
) -> list[pv.Workspace]:
    """Workspaces with their template's name and latest build: the same few
    queries for one workspace or ten thousand (listings run them all)."""
    template_ids = sorted({str(row.template_id) for row in rows})
    names: dict[str, str] = {}
    for chunk in in_slices(template_ids):
        query = sa.select(templates.c.id, templates.c.name).where(templates.c.id.in_(chunk))
        names.update((t.id, t.name) for t in conn.execute(query))
    latest = _latest_build_rows(conn, [row.id for row in rows])
    builds = dict(zip(latest, _build_messages(conn, list(latest.values())), strict=True))
    workspaces_out = []
    for row in rows:
        workspace = pv.Workspace(
            id=row.id,
            name=row.name,
            owner=row.owner,
            template_id=row.template_id,
            template_name=names[row.template_id],
            deleted=row.deleted_at is not None,
        )
        workspace.created_at.FromMicroseconds(row.created_at)
        if row.id in builds:
            workspace.latest_build.CopyFrom(builds[row.id])
        workspaces_out.append(workspace)
    return workspaces_out


def workspace_get(conn: Connection, workspace_id: str) -> pv.Workspace:
    row = _workspace_row(conn, pv.WorkspaceRef(id=workspace_id))
    return _workspace_messages(conn, [row])[0]


def workspace_show(conn: Connection, ref: pv.WorkspaceRef) -> pv.GetWorkspaceResponse:
    row = _workspace_row(conn, ref)
    rows = conn.execute(
        sa.select(workspace_builds)
        .where(workspace_builds.c.workspace_id == row.id)
        .order_by(workspace_builds.c.build_number.desc())
    ).all()
    return pv.GetWorkspaceResponse(
        workspace=_workspace_messages(conn, [row])[0], builds=_build_messages(conn, list(rows))
    )


def workspace_list(conn: Connection, owner: str, include_deleted: bool) -> list[pv.Workspace]:
    query = sa.select(workspaces).order_by(workspaces.c.owner, workspaces.c.name_key)
    if owner:
        query = query.where(workspaces.c.owner == owner)
    if not include_deleted:
        query = query.where(workspaces.c.deleted_at.is_(None))
    return _workspace_messages(conn, list(conn.execute(query).all()))
