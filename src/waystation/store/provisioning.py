"""Provisioning transactions: templates, workspaces, builds, quotas, and the
provisioner side of the job state machine.

A provisioner job is a `jobs` row of kind "provisioner" (the engine's states,
times, holder and timers, exactly as for runner jobs) plus a
`provisioner_jobs` row with what only daemons need. Acquisition is the
provisioner's assignment: QUEUED -> RUNNING in one conditional UPDATE (there
is no ack step upstream), the holder being the daemon's id. Ownership is by
daemon id, so a daemon that reconnects under the same id keeps its job.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa
from google.rpc import code_pb2, status_pb2
from sqlalchemy.engine import Connection, Row

from waystation import validate
from waystation.config import MAX_MESSAGE_BYTES
from waystation.engine.rules import ERROR, FINAL, QUEUED, RUNNING, SUCCESS
from waystation.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from waystation.ids import new_id
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.store import jobs as job_tx
from waystation.store.prepared import Prepared
from waystation.store.runners import in_slices, renew_leases
from waystation.store.schema import (
    jobs,
    provisioner_daemons,
    provisioner_job_tags,
    provisioner_jobs,
    quotas,
    template_versions,
    templates,
    workspace_builds,
    workspaces,
)

KIND = "provisioner"
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


def _tag(key: str, value: str) -> str:
    return json.dumps([key, value], separators=(",", ":"))


def check_tags(tags: Mapping[str, str]) -> dict[str, str]:
    for key, value in tags.items():
        validate.name("tag", key, field="key")
        if len(value) > validate.MAX_NAME:
            raise InvalidArgument(f"tag {key} value is too long")
    return dict(tags)


# -- queueing ----------------------------------------------------------------------


def _queue(
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
            [{"job_id": job_id, "tag": _tag(k, v)} for k, v in tags.items()],
        )
    return Queued(job_id, provisioner, dict(tags))


# -- templates -----------------------------------------------------------------------


def template_push(
    conn: Connection, request: pv.PushTemplateRequest, archive_hash: str, now: int
) -> tuple[pv.Template, pv.TemplateVersion, Queued]:
    name = validate.name("template", request.template)
    provisioner = validate.name("template", request.provisioner, field="provisioner")
    tags = check_tags(request.tags)
    # Locked: versions of one template are numbered one push at a time.
    find = sa.select(templates).where(templates.c.name_key == name.lower()).with_for_update()
    row = conn.execute(find).first()
    if row is None:
        try:
            with conn.begin_nested():
                conn.execute(
                    sa.insert(templates).values(
                        id=new_id(), name=name, name_key=name.lower(), created_at=now
                    )
                )
        except sa.exc.IntegrityError:
            pass  # another replica created it just now
        row = conn.execute(find).one()
    template_id = row.id
    number = (
        conn.execute(
            sa.select(sa.func.max(template_versions.c.number)).where(
                template_versions.c.template_id == template_id
            )
        ).scalar()
        or 0
    ) + 1
    version_name = request.version_name or f"v{number}"
    validate.name("template version", version_name)
    exists = conn.execute(
        sa.select(template_versions.c.id).where(
            template_versions.c.template_id == template_id,
            template_versions.c.name == version_name,
        )
    ).first()
    if exists is not None:
        raise AlreadyExists(f"template {name} already has a version named {version_name}")
    version_id = new_id()
    job_id = new_id()
    version = pv.TemplateVersion(
        id=version_id,
        template_id=template_id,
        template_name=row.name,
        name=version_name,
        provisioner=provisioner,
        tags=tags,
        job_id=job_id,
        user_variable_values=request.user_variable_values,
        archive_hash=archive_hash,
        archive_size=len(request.archive),
    )
    version.created_at.FromMicroseconds(now)
    conn.execute(
        sa.insert(template_versions).values(
            id=version_id,
            template_id=template_id,
            name=version_name,
            number=number,
            created_at=now,
            job_id=job_id,
            archive=request.archive,
            data=version.SerializeToString(deterministic=True),
        )
    )
    payload = pd.AcquiredJob(
        template_import=pd.AcquiredJob.TemplateImport(
            metadata=sdk.Metadata(
                template_id=template_id,
                template_name=version.template_name,
                template_version=version_name,
            ),
            user_variable_values=request.user_variable_values,
        )
    )
    queued = _queue(
        conn, TEMPLATE_IMPORT, provisioner, tags, "", version_id, None, payload, now, job_id
    )
    return template_get(conn, template_id), version_get(conn, version_id), queued


def _templates_query() -> sa.Select[tuple[object, ...]]:
    count = (
        sa.select(sa.func.count())
        .where(template_versions.c.template_id == templates.c.id)
        .scalar_subquery()
    )
    return sa.select(templates, count.label("version_count"))


def template_get(conn: Connection, template_id: str) -> pv.Template:
    row = conn.execute(_templates_query().where(templates.c.id == template_id)).first()
    if row is None:
        raise NotFound("template not found")
    return _template_message(row)


def _template_row(conn: Connection, name: str) -> Row[tuple[object, ...]]:
    validate.required("template", "name", name)
    row = conn.execute(sa.select(templates).where(templates.c.name_key == name.lower())).first()
    if row is None:
        raise NotFound(f"template {name} not found")
    return row


def _template_message(row: Row[tuple[object, ...]]) -> pv.Template:
    template = pv.Template(
        id=row.id,
        name=row.name,
        active_version_id=row.active_version_id or "",
        version_count=row.version_count,
    )
    template.created_at.FromMicroseconds(row.created_at)
    return template


def template_list(conn: Connection) -> list[pv.Template]:
    rows = conn.execute(_templates_query().order_by(templates.c.name_key)).all()
    return [_template_message(r) for r in rows]


def template_versions_list(conn: Connection, name: str) -> list[pv.TemplateVersion]:
    row = _template_row(conn, name)
    ids = conn.execute(
        sa.select(template_versions.c.id)
        .where(template_versions.c.template_id == row.id)
        .order_by(template_versions.c.number)
    ).scalars()
    return [version_get(conn, v) for v in ids]


def version_resolve(conn: Connection, ref: str) -> str:
    """A version id, "TEMPLATE" (its active version) or "TEMPLATE@NAME" -> version id."""
    validate.required("template version", "reference", ref)
    if "@" in ref:
        name, _, version_name = ref.partition("@")
        row = _template_row(conn, name)
        found = conn.execute(
            sa.select(template_versions.c.id).where(
                template_versions.c.template_id == row.id,
                template_versions.c.name == version_name,
            )
        ).scalar()
        if found is None:
            raise NotFound(f"template {name} has no version {version_name}")
        return str(found)
    by_id = conn.execute(
        sa.select(template_versions.c.id).where(template_versions.c.id == ref)
    ).scalar()
    if by_id is not None:
        return str(by_id)
    row = _template_row(conn, ref)
    if not row.active_version_id:
        raise FailedPrecondition(
            f"template {row.name} has no active version yet: no import of it has succeeded"
        )
    return str(row.active_version_id)


def version_get(conn: Connection, version_id: str) -> pv.TemplateVersion:
    data = conn.execute(
        sa.select(template_versions.c.data).where(template_versions.c.id == version_id)
    ).scalar()
    if data is None:
        raise NotFound("template version not found")
    version = pv.TemplateVersion.FromString(data)
    version.job.CopyFrom(job_get(conn, version.job_id))
    return version


def _version_update(conn: Connection, version: pv.TemplateVersion) -> None:
    version.ClearField("job")
    conn.execute(
        sa.update(template_versions)
        .where(template_versions.c.id == version.id)
        .values(data=version.SerializeToString(deterministic=True))
    )


def variable_values(version: pv.TemplateVersion) -> tuple[list[sdk.VariableValue], list[str]]:
    """Each template variable's value (the user's, else its default), and the
    required ones that have neither."""
    given = {v.name: v.value for v in version.user_variable_values}
    values, missing = [], []
    for variable in version.template_variables:
        if variable.name in given:
            value = given[variable.name]
        elif variable.required:
            missing.append(variable.name)
            continue
        else:
            value = variable.default_value
        values.append(
            sdk.VariableValue(name=variable.name, value=value, sensitive=variable.sensitive)
        )
    return values, missing


# -- workspaces and builds ---------------------------------------------------------


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
    queued = _queue(
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


def merge_parameters(
    version: pv.TemplateVersion,
    previous: Iterable[sdk.RichParameterValue],
    given: Iterable[sdk.RichParameterValue],
) -> list[sdk.RichParameterValue]:
    """The build's parameter values: given over previous over defaults, checked
    against what the template version declares."""
    declared = {p.name: p for p in version.rich_parameters}
    values = {p.name: p.value for p in previous if p.name in declared}
    for item in given:
        if item.name not in declared:
            raise InvalidArgument(
                f"parameter {item.name!r} is not a parameter of template version"
                f" {version.template_name}@{version.name}"
            )
        values[item.name] = item.value
    result = []
    for name, parameter in declared.items():
        if name not in values:
            if parameter.required and not parameter.default_value:
                raise FailedPrecondition(f"parameter {name!r} is required")
            values[name] = parameter.default_value
        _check_parameter(parameter, values[name])
        result.append(sdk.RichParameterValue(name=name, value=values[name]))
    return result


def _check_parameter(parameter: sdk.RichParameter, value: str) -> None:
    if parameter.options and value not in {o.value for o in parameter.options}:
        allowed = ", ".join(o.value for o in parameter.options)
        raise InvalidArgument(f"parameter {parameter.name!r}: {value!r} is not one of {allowed}")
    if parameter.type == "number" and value:
        try:
            number = float(value)
        except ValueError:
            raise InvalidArgument(
                f"parameter {parameter.name!r}: {value!r} is not a number"
            ) from None
        low = parameter.validation_min if parameter.HasField("validation_min") else None
        high = parameter.validation_max if parameter.HasField("validation_max") else None
        if (low is not None and number < low) or (high is not None and number > high):
            raise InvalidArgument(
                f"parameter {parameter.name!r}: {value} is outside [{low}, {high}]"
            )


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
    jobs_by_id = _jobs_by_id(conn, [row.job_id for row in rows])
    builds = []
    for row in rows:
        build = pv.WorkspaceBuild.FromString(row.data)
        build.daily_cost = row.daily_cost
        build.state_size = len(row.state or b"")
        build.job.CopyFrom(jobs_by_id[row.job_id])
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


def dry_run(conn: Connection, request: pv.DryRunRequest, now: int) -> tuple[str, Queued]:
    version = version_get(conn, version_resolve(conn, request.version))
    parameters = merge_parameters(version, [], request.rich_parameter_values)
    values, _ = variable_values(version)
    name = request.workspace_name or "dry-run"
    payload = pd.AcquiredJob(
        template_dry_run=pd.AcquiredJob.TemplateDryRun(
            rich_parameter_values=parameters,
            variable_values=values,
            metadata=sdk.Metadata(
                workspace_transition=sdk.START,
                workspace_name=name,
                workspace_owner=request.owner,
                workspace_owner_name=request.owner,
                template_id=version.template_id,
                template_name=version.template_name,
                template_version=version.name,
            ),
        )
    )
    queued = _queue(
        conn,
        TEMPLATE_DRY_RUN,
        version.provisioner,
        version.tags,
        request.owner,
        version.id,
        None,
        payload,
        now,
    )
    return queued.job_id, queued


# -- quotas --------------------------------------------------------------------------


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
    row = _owned(conn, request.job_id, daemon_id)
    _touch(conn, row.id, daemon_id, now, hang)
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


# -- the daemon's side of the state machine --------------------------------------------


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


def _candidates(daemon: Daemon) -> Prepared:
    """The oldest pending jobs of a provisioner type the daemon serves whose tags
    it all has; one statement per kind of daemon, kept."""
    key = (tuple(sorted(daemon.provisioners)), tuple(sorted(daemon.tags.items())))
    statement = _CANDIDATES.get(key)
    if statement is None:
        # Equalities rather than IN lists: prepared statements take no lists.
        held = [provisioner_job_tags.c.tag == _tag(k, v) for k, v in key[1]]
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
        if not _TAKE.count(conn, id=job_id, daemon=daemon.id, now=now, deadline=now + hang):
            continue
        job = _acquired(conn, job_id)
        size = job.ByteSize()
        if size > MAX_MESSAGE_BYTES - 64 * 1024:
            _finish(
                conn,
                job_id,
                now,
                ERROR,
                error=f"the job's payload is {size} bytes: more than the 4 MiB message limit",
            )
            failed.append(job_id)
            continue
        return job, failed
    return None, failed


_TAKE = Prepared(
    sa.update(jobs)
    .where(jobs.c.id == sa.bindparam("id"), jobs.c.state == QUEUED)
    .values(
        state=RUNNING,
        assigned_runner=sa.bindparam("daemon"),
        assign_time=sa.bindparam("now"),
        ack_time=sa.bindparam("now"),
        heartbeat_deadline=sa.bindparam("deadline"),
    )
)


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


def _owned(conn: Connection, job_id: str, daemon_id: str) -> Any:
    """The job, locked, if this daemon holds it and it has not ended; upstream's
    messages otherwise."""
    validate.required("job", "job_id", job_id)
    row = job_tx.job_row(conn, job_id, lock=True, kind=KIND)
    if row.assigned_runner is None:
        raise FailedPrecondition("job isn't running yet")
    if row.assigned_runner != daemon_id:
        raise PermissionDenied("you don't own this job")
    if row.state in FINAL:
        raise FailedPrecondition("job already completed")
    return row


def _touch(conn: Connection, job_id: str, daemon_id: str, now: int, hang: int) -> None:
    _TOUCH_JOB.run(conn, id=job_id, deadline=now + hang)
    _TOUCH_PROVISIONER_JOB.run(conn, id=job_id, now=now)
    # The daemon is online while its job lives.
    _TOUCH_DAEMON.run(conn, id=daemon_id, now=now, until=now + hang)


_TOUCH_JOB = Prepared(
    sa.update(jobs)
    .where(jobs.c.id == sa.bindparam("id"), jobs.c.state == RUNNING)
    .values(heartbeat_deadline=sa.bindparam("deadline"))
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
    row = _owned(conn, request.job_id, daemon_id)
    _touch(conn, row.id, daemon_id, now, hang)
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
        _version_update(conn, version)
    return result


def _job_version(conn: Connection, job_id: str) -> pv.TemplateVersion:
    version_id = conn.execute(
        sa.select(provisioner_jobs.c.template_version_id).where(provisioner_jobs.c.job_id == job_id)
    ).scalar_one()
    return version_get(conn, version_id)


def job_complete(conn: Connection, daemon_id: str, completed: pd.CompletedJob, now: int) -> None:
    row = _owned(conn, completed.job_id, daemon_id)
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
        _version_update(conn, version)
        conn.execute(
            sa.update(templates)
            .where(templates.c.id == version.template_id)
            .values(active_version_id=version.id)
        )
    elif which == WORKSPACE_BUILD:
        _build_done(
            conn, row.id, completed.workspace_build.state, completed.workspace_build.resources, now
        )
    _finish(conn, row.id, now, SUCCESS, result=completed.SerializeToString(deterministic=True))


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
    row = _owned(conn, failed.job_id, daemon_id)
    which = failed.WhichOneof("type")
    if which is not None and which != row.operation:
        raise InvalidArgument(f"type payload is {which}, but the job is a {row.operation}")
    if which == WORKSPACE_BUILD and failed.workspace_build.state:
        _build_done(conn, row.id, failed.workspace_build.state, None, now)  # partial state
    _finish(conn, row.id, now, ERROR, error=failed.error or "failed", error_code=failed.error_code)


def _finish(
    conn: Connection,
    job_id: str,
    now: int,
    state: int,
    *,
    error: str | None = None,
    error_code: str = "",
    result: bytes | None = None,
) -> None:
    values: dict[str, object] = {
        "state": state,
        "complete_time": now,
        "heartbeat_deadline": None,
        "result": result,
    }
    if error is not None:
        values["error"] = status_pb2.Status(
            code=code_pb2.UNKNOWN, message=error
        ).SerializeToString()
    conn.execute(
        sa.update(jobs)
        .where(jobs.c.id == job_id, jobs.c.state.in_((QUEUED, RUNNING)))
        .values(values)
    )
    if error_code:
        conn.execute(
            sa.update(provisioner_jobs)
            .where(provisioner_jobs.c.job_id == job_id)
            .values(error_code=error_code)
        )


def jobs_fail_hung(conn: Connection, job_ids: Iterable[str], now: int, hang: float) -> list[str]:
    """RUNNING provisioner jobs past their hang deadline: failed, with a log line saying why."""
    ended = []
    span = f"{hang / 60:g} minutes" if hang >= 120 else f"{hang:g} seconds"
    for job_id in job_ids:
        row = conn.execute(
            sa.select(jobs.c.assigned_runner)
            .where(
                jobs.c.id == job_id,
                jobs.c.state == RUNNING,
                jobs.c.heartbeat_deadline <= now,
            )
            .with_for_update()  # an UpdateJob appending logs meanwhile waits for us
        ).first()
        if row is None:
            continue
        why = (
            f"no update from provisioner daemon {row.assigned_runner} for {span}:"
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
        _finish(conn, job_id, now, ERROR, error=why, error_code="HUNG")
        ended.append(job_id)
    return ended


def connection_broken(conn: Connection, job_id: str, daemon_id: str, now: int) -> bool:
    """An acquired job whose daemon's stream broke before it was sent: failed (upstream)."""
    row = conn.execute(
        sa.select(jobs.c.state).where(
            jobs.c.id == job_id, jobs.c.state == RUNNING, jobs.c.assigned_runner == daemon_id
        )
    ).first()
    if row is None:
        return False
    _finish(conn, job_id, now, ERROR, error="connection to provisioner daemon broken")
    return True


# -- logs ------------------------------------------------------------------------------


def output_append_logs(conn: Connection, job_id: str, logs: list[pd.Log]) -> None:
    """One batch of log lines; the job row is locked by the caller, so seq is ours."""
    seq = job_tx.output_next_seq(conn, job_id)
    job_tx.output_append(conn, job_id, seq, [Logs(logs=logs).SerializeToString()])


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


def _jobs_by_id(conn: Connection, job_ids: list[str]) -> dict[str, Job]:
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
        daemon_id=row.assigned_runner or "",
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
                f"{_tags_text(job.tags)}"
            )
            continue
        takeable = [jid for jid, p, t in order if any(d.fits(p, t) for d in able)]
        job.queue_size = len(takeable)
        job.queue_position = takeable.index(job.id) + 1 if job.id in takeable else 0


def _tags_text(tags: Mapping[str, str]) -> str:
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
            sa.select(jobs.c.assigned_runner, jobs.c.id).where(
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


def jobs_queued_kinds(conn: Connection) -> list[tuple[str, dict[str, str]]]:
    """(provisioner, tags) of every pending job: the poll that wakes daemons."""
    rows = conn.execute(
        sa.select(provisioner_jobs.c.provisioner, provisioner_jobs.c.tags)
        .select_from(jobs.join(provisioner_jobs))
        .where(jobs.c.kind == KIND, jobs.c.state == QUEUED)
        .distinct()
    ).all()
    return [(r.provisioner, json.loads(r.tags)) for r in rows]
