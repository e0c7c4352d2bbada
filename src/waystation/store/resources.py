"""Bases, projects and targets: the transactions that read and write them.

Upstream Vagrant semantics (docs/protocols.md, section 7): server-made ULIDs, unique names
(ignoring case) and paths, parents that must exist, find orders, and the
`basis.projects` / `project.targets` lists, which are rebuilt from foreign keys
on every read so they cannot drift.

Every function here takes a Connection inside a transaction that the caller
(`Database.write` or `Database.read`) owns.
"""

from __future__ import annotations

from typing import TypeVar

import sqlalchemy as sa
from google.protobuf.message import Message
from sqlalchemy.engine import Connection, Row

from waystation import validate
from waystation.errors import AlreadyExists, FailedPrecondition, NotFound
from waystation.ids import new_id, new_uuid
from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store.schema import bases, projects, targets

# -- basis ---------------------------------------------------------------------


def basis_upsert(conn: Connection, basis: vs.Basis) -> vs.Basis:
    basis = _copy(basis)
    validate.name("basis", basis.name)
    validate.path("basis", basis.path)
    validate.resource_id("basis", basis.resource_id)
    if basis.resource_id:
        _basis_row(conn, basis.resource_id)  # replacing requires it to exist
    else:
        basis.resource_id = new_id()
    unique(conn, bases, "basis", "name", bases.c.name_key == basis.name.lower(), basis.resource_id)
    unique(conn, bases, "basis", "path", bases.c.path == basis.path, basis.resource_id)
    del basis.projects[:]  # derived from the projects table on read
    data = serialize("basis", basis)
    values: dict[str, object] = {
        "name": basis.name,
        "name_key": basis.name.lower(),
        "path": basis.path,
        "data": data,
    }
    upsert_row(conn, bases, "basis", basis.resource_id, values)
    return _basis_message(conn, _basis_row(conn, basis.resource_id))


def basis_get(conn: Connection, ref: sdk.Ref.Basis) -> vs.Basis:
    validate.required("basis", "resource_id", ref.resource_id)
    return _basis_message(conn, _basis_row(conn, ref.resource_id))


def basis_find(conn: Connection, basis: vs.Basis) -> vs.Basis:
    row = _find_basis_row(conn, basis.resource_id, basis.name, basis.path)
    if row is None:
        raise NotFound(f"basis not found: {_describe(basis.resource_id, basis.name, basis.path)}")
    return _basis_message(conn, row)


def basis_list(conn: Connection) -> list[sdk.Ref.Basis]:
    rows = conn.execute(sa.select(bases.c.resource_id, bases.c.name).order_by(bases.c.name_key))
    return [sdk.Ref.Basis(resource_id=r.resource_id, name=r.name) for r in rows]


def basis_delete(conn: Connection, ref: sdk.Ref.Basis) -> bool:
    """Delete a basis with its projects and their targets; False if it was absent."""
    row = _find_basis_row(conn, ref.resource_id, ref.name, ref.path)
    if row is None:
        return False
    conn.execute(sa.delete(bases).where(bases.c.resource_id == row.resource_id))
    return True


def _basis_row(conn: Connection, resource_id: str) -> Row[tuple[str, ...]]:
    row = conn.execute(sa.select(bases).where(bases.c.resource_id == resource_id)).first()
    if row is None:
        raise NotFound(f"basis not found: resource_id {resource_id!r}")
    return row


def _find_basis_row(
    conn: Connection, resource_id: str, name: str, path: str
) -> Row[tuple[str, ...]] | None:
    if not (resource_id or name or path):
        raise FailedPrecondition("basis resource_id, name or path is required")
    for column, value in (
        (bases.c.resource_id, resource_id),
        (bases.c.name_key, name.lower()),
        (bases.c.path, path),
    ):
        if value:
            row = conn.execute(sa.select(bases).where(column == value)).first()
            if row is not None:
                return row
    return None


def _basis_message(conn: Connection, row: Row[tuple[str, ...]]) -> vs.Basis:
    basis = vs.Basis.FromString(row.data)
    children = conn.execute(
        sa.select(projects.c.resource_id, projects.c.name, projects.c.path)
        .where(projects.c.basis_id == row.resource_id)
        .order_by(projects.c.name_key)
    )
    ref = sdk.Ref.Basis(resource_id=row.resource_id, name=row.name, path=row.path)
    for child in children:
        basis.projects.add(
            resource_id=child.resource_id, name=child.name, path=child.path, basis=ref
        )
    return basis


# -- project -------------------------------------------------------------------


def project_upsert(conn: Connection, project: vs.Project) -> vs.Project:
    project = _copy(project)
    validate.name("project", project.name)
    validate.path("project", project.path)
    validate.resource_id("project", project.resource_id)
    if not project.HasField("basis"):
        raise FailedPrecondition("project basis is required")
    basis = _find_basis_row(conn, project.basis.resource_id, project.basis.name, project.basis.path)
    if basis is None:
        raise FailedPrecondition(
            "project basis does not exist: "
            + _describe(project.basis.resource_id, project.basis.name, project.basis.path)
        )
    if project.resource_id:
        _project_row(conn, project.resource_id)
    else:
        project.resource_id = new_id()
    key = project.name.lower()
    unique(
        conn,
        projects,
        "project",
        "name",
        sa.and_(projects.c.basis_id == basis.resource_id, projects.c.name_key == key),
        project.resource_id,
        scope=f" in basis {basis.name!r}",
    )
    unique(conn, projects, "project", "path", projects.c.path == project.path, project.resource_id)
    del project.targets[:]
    project.ClearField("basis")
    values: dict[str, object] = {
        "basis_id": basis.resource_id,
        "name": project.name,
        "name_key": key,
        "path": project.path,
        "data": serialize("project", project),
    }
    upsert_row(conn, projects, "project", project.resource_id, values)
    return _project_message(conn, _project_row(conn, project.resource_id))


def project_get(conn: Connection, ref: sdk.Ref.Project) -> vs.Project:
    validate.required("project", "resource_id", ref.resource_id)
    return _project_message(conn, _project_row(conn, ref.resource_id))


def project_find(conn: Connection, project: vs.Project) -> vs.Project:
    basis = project.basis if project.HasField("basis") else None
    row = _find_project_row(conn, project.resource_id, project.name, project.path, basis)
    if row is None:
        raise NotFound(
            "project not found: " + _describe(project.resource_id, project.name, project.path)
        )
    return _project_message(conn, row)


def project_list(conn: Connection) -> list[sdk.Ref.Project]:
    rows = conn.execute(
        sa.select(
            projects.c.resource_id,
            projects.c.name,
            projects.c.path,
            bases.c.resource_id.label("basis_id"),
            bases.c.name.label("basis_name"),
        )
        .join(bases, bases.c.resource_id == projects.c.basis_id)
        .order_by(bases.c.name_key, projects.c.name_key)
    )
    return [
        sdk.Ref.Project(
            resource_id=r.resource_id,
            name=r.name,
            path=r.path,
            basis=sdk.Ref.Basis(resource_id=r.basis_id, name=r.basis_name),
        )
        for r in rows
    ]


def project_delete(conn: Connection, ref: sdk.Ref.Project) -> bool:
    """Delete a project and its targets; False if it was absent."""
    basis = ref.basis if ref.HasField("basis") else None
    row = _find_project_row(conn, ref.resource_id, ref.name, ref.path, basis)
    if row is None:
        return False
    conn.execute(sa.delete(projects).where(projects.c.resource_id == row.resource_id))
    return True


def _project_row(conn: Connection, resource_id: str) -> Row[tuple[str, ...]]:
    row = conn.execute(sa.select(projects).where(projects.c.resource_id == resource_id)).first()
    if row is None:
        raise NotFound(f"project not found: resource_id {resource_id!r}")
    return row


def _find_project_row(
    conn: Connection, resource_id: str, name: str, path: str, basis: sdk.Ref.Basis | None
) -> Row[tuple[str, ...]] | None:
    """Find order: resource_id, then name (within the basis when given), then path."""
    if not (resource_id or name or path):
        raise FailedPrecondition("project resource_id, name or path is required")
    if resource_id:
        row = conn.execute(sa.select(projects).where(projects.c.resource_id == resource_id)).first()
        if row is not None:
            return row
    if name:
        query = sa.select(projects).where(projects.c.name_key == name.lower())
        if basis is not None and (basis.resource_id or basis.name or basis.path):
            parent = _find_basis_row(conn, basis.resource_id, basis.name, basis.path)
            if parent is None:
                return None
            query = query.where(projects.c.basis_id == parent.resource_id)
        rows = conn.execute(query.limit(2)).all()
        if len(rows) > 1:
            raise FailedPrecondition(
                f"project name {name!r} is used in several bases: give the basis too"
            )
        if rows:
            return rows[0]
    if path:
        return conn.execute(sa.select(projects).where(projects.c.path == path)).first()
    return None


def _project_message(conn: Connection, row: Row[tuple[str, ...]]) -> vs.Project:
    project = vs.Project.FromString(row.data)
    basis = conn.execute(
        sa.select(bases.c.resource_id, bases.c.name, bases.c.path).where(
            bases.c.resource_id == row.basis_id
        )
    ).one()
    project.basis.CopyFrom(
        sdk.Ref.Basis(resource_id=basis.resource_id, name=basis.name, path=basis.path)
    )
    me = _project_ref(row, project.basis)
    children = conn.execute(
        sa.select(targets.c.resource_id, targets.c.name)
        .where(targets.c.project_id == row.resource_id)
        .order_by(targets.c.name_key)
    )
    for child in children:
        project.targets.add(resource_id=child.resource_id, name=child.name, project=me)
    return project


def _project_ref(row: Row[tuple[str, ...]], basis: sdk.Ref.Basis) -> sdk.Ref.Project:
    return sdk.Ref.Project(resource_id=row.resource_id, name=row.name, path=row.path, basis=basis)


# -- target --------------------------------------------------------------------


def target_upsert(conn: Connection, project_ref: sdk.Ref.Project, target: vs.Target) -> vs.Target:
    target = _copy(target)
    validate.name("target", target.name)
    validate.resource_id("target", target.resource_id)
    validate.resource_id("target", target.uuid, field="uuid")
    if not _ref_given(project_ref) and target.HasField("project"):
        project_ref = target.project
    if not _ref_given(project_ref):
        raise FailedPrecondition("target project is required")
    project = _find_project_row(
        conn,
        project_ref.resource_id,
        project_ref.name,
        project_ref.path,
        project_ref.basis if project_ref.HasField("basis") else None,
    )
    if project is None:
        raise FailedPrecondition(
            "target project does not exist: "
            + _describe(project_ref.resource_id, project_ref.name, project_ref.path)
        )
    key = target.name.lower()
    existing: Row[tuple[str, ...]] | None
    if target.resource_id:
        existing = _target_row(conn, target.resource_id)
    else:
        # Upstream: an upsert without an id updates the project's target of that name.
        existing = conn.execute(
            sa.select(targets).where(
                targets.c.project_id == project.resource_id, targets.c.name_key == key
            )
        ).first()
    target.resource_id = existing.resource_id if existing is not None else new_id()
    if not target.uuid:
        target.uuid = existing.uuid if existing is not None else new_uuid()
    unique(
        conn,
        targets,
        "target",
        "name",
        sa.and_(targets.c.project_id == project.resource_id, targets.c.name_key == key),
        target.resource_id,
        scope=f" in project {project.name!r}",
    )
    unique(conn, targets, "target", "uuid", targets.c.uuid == target.uuid, target.resource_id)
    target.ClearField("project")
    values: dict[str, object] = {
        "project_id": project.resource_id,
        "name": target.name,
        "name_key": key,
        "uuid": target.uuid,
        "data": serialize("target", target),
    }
    upsert_row(conn, targets, "target", target.resource_id, values)
    return _target_message(conn, _target_row(conn, target.resource_id))


def target_get(conn: Connection, project_ref: sdk.Ref.Project, ref: sdk.Ref.Target) -> vs.Target:
    if not ref.resource_id and not ref.name:
        raise FailedPrecondition("target resource_id or name is required")
    row = _find_target_row(conn, project_ref, ref.resource_id, ref.name, ref.project, "")
    if row is None:
        raise NotFound(f"target not found: {_describe(ref.resource_id, ref.name, '')}")
    return _target_message(conn, row)


def target_find(conn: Connection, target: vs.Target) -> vs.Target:
    if not (target.resource_id or target.name or target.uuid):
        raise FailedPrecondition("target resource_id, name or uuid is required")
    row = _find_target_row(
        conn, sdk.Ref.Project(), target.resource_id, target.name, target.project, target.uuid
    )
    if row is None:
        described = _describe(target.resource_id, target.name, "")
        if target.uuid:
            described = f"{described}, uuid {target.uuid!r}".removeprefix("no identifier given, ")
        raise NotFound(f"target not found: {described}")
    return _target_message(conn, row)


def target_list(conn: Connection) -> list[sdk.Ref.Target]:
    rows = conn.execute(
        sa.select(
            targets.c.resource_id,
            targets.c.name,
            projects.c.resource_id.label("project_id"),
            projects.c.name.label("project_name"),
        )
        .join(projects, projects.c.resource_id == targets.c.project_id)
        .order_by(projects.c.name_key, targets.c.name_key)
    )
    return [
        sdk.Ref.Target(
            resource_id=r.resource_id,
            name=r.name,
            project=sdk.Ref.Project(resource_id=r.project_id, name=r.project_name),
        )
        for r in rows
    ]


def target_delete(conn: Connection, project_ref: sdk.Ref.Project, ref: sdk.Ref.Target) -> bool:
    if not ref.resource_id and not ref.name:
        raise FailedPrecondition("target resource_id or name is required")
    row = _find_target_row(conn, project_ref, ref.resource_id, ref.name, ref.project, "")
    if row is None:
        return False
    conn.execute(sa.delete(targets).where(targets.c.resource_id == row.resource_id))
    return True


def _target_row(conn: Connection, resource_id: str) -> Row[tuple[str, ...]]:
    row = conn.execute(sa.select(targets).where(targets.c.resource_id == resource_id)).first()
    if row is None:
        raise NotFound(f"target not found: resource_id {resource_id!r}")
    return row


def _find_target_row(
    conn: Connection,
    project_ref: sdk.Ref.Project,
    resource_id: str,
    name: str,
    inner_project: sdk.Ref.Project,
    uuid: str,
) -> Row[tuple[str, ...]] | None:
    """Find order: resource_id, then name within the project, then uuid."""
    if resource_id:
        row = conn.execute(sa.select(targets).where(targets.c.resource_id == resource_id)).first()
        if row is not None:
            return row
    if name:
        scope = project_ref if _ref_given(project_ref) else inner_project
        if not _ref_given(scope):
            if not (resource_id or uuid):
                raise FailedPrecondition("target project is required to find a target by name")
            scope = sdk.Ref.Project()
        project = (
            _find_project_row(
                conn,
                scope.resource_id,
                scope.name,
                scope.path,
                scope.basis if scope.HasField("basis") else None,
            )
            if _ref_given(scope)
            else None
        )
        if project is not None:
            row = conn.execute(
                sa.select(targets).where(
                    targets.c.project_id == project.resource_id,
                    targets.c.name_key == name.lower(),
                )
            ).first()
            if row is not None:
                return row
    if uuid:
        return conn.execute(sa.select(targets).where(targets.c.uuid == uuid)).first()
    return None


def _target_message(conn: Connection, row: Row[tuple[str, ...]]) -> vs.Target:
    target = vs.Target.FromString(row.data)
    project = _project_message(conn, _project_row(conn, row.project_id))
    target.project.CopyFrom(
        sdk.Ref.Project(
            resource_id=project.resource_id,
            name=project.name,
            path=project.path,
            basis=project.basis,
        )
    )
    return target


# -- shared --------------------------------------------------------------------


_M = TypeVar("_M", vs.Basis, vs.Project, vs.Target)


def _copy(message: _M) -> _M:
    out = type(message)()
    out.CopyFrom(message)
    return out


def _ref_given(ref: sdk.Ref.Project) -> bool:
    return bool(ref.resource_id or ref.name or ref.path)


def serialize(kind: str, message: Message) -> bytes:
    data = message.SerializeToString(deterministic=True)
    validate.record_size(kind, len(data))
    return data


def unique(
    conn: Connection,
    table: sa.Table,
    kind: str,
    field: str,
    clause: sa.ColumnElement[bool],
    own_id: str,
    scope: str = "",
) -> None:
    other = conn.execute(
        sa.select(table.c.resource_id).where(clause, table.c.resource_id != own_id).limit(1)
    ).scalar()
    if other is not None:
        raise AlreadyExists(f"{kind} {field} is already used{scope} by {kind} {other}")


def upsert_row(
    conn: Connection, table: sa.Table, kind: str, resource_id: str, values: dict[str, object]
) -> None:
    try:
        updated = conn.execute(
            sa.update(table).where(table.c.resource_id == resource_id).values(**values)
        ).rowcount
        if not updated:
            conn.execute(sa.insert(table).values(resource_id=resource_id, **values))
    except sa.exc.IntegrityError as exc:
        # A concurrent writer (another replica) took the name since we checked.
        raise AlreadyExists(f"{kind} conflicts with a record written concurrently") from exc


def _describe(resource_id: str, name: str, path: str) -> str:
    parts = [
        f"{label} {value!r}"
        for label, value in (("resource_id", resource_id), ("name", name), ("path", path))
        if value
    ]
    return ", ".join(parts) or "no identifier given"
