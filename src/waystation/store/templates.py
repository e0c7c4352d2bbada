"""Templates and their versions: push (which queues the import), read,
resolve a version reference; template parameters; dry runs of a version."""

from __future__ import annotations

from collections.abc import Iterable

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Row

from waystation import validate
from waystation.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from waystation.ids import new_id
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.store.provisioner_queue import (
    TEMPLATE_DRY_RUN,
    TEMPLATE_IMPORT,
    Queued,
    check_tags,
    queue_job,
)
from waystation.store.provisioner_views import job_get
from waystation.store.schema import template_versions, templates


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
    queued = queue_job(
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


def version_update(conn: Connection, version: pv.TemplateVersion) -> None:
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
    queued = queue_job(
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
