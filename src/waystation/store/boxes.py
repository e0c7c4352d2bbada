"""Boxes: keyed by the client's resource_id, unique by (name, version, provider)."""

from __future__ import annotations

import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp
from sqlalchemy.engine import Connection, Row

from waystation import validate, versions
from waystation.errors import FailedPrecondition, InvalidArgument, NotFound
from waystation.ids import new_id
from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store.resources import serialize, unique, upsert_row
from waystation.store.schema import boxes

# Upstream stores a box without a version (or version "0") as 0.0.0.
DEFAULT_VERSION = "0.0.0"


def box_upsert(conn: Connection, box: vs.Box, now: Timestamp) -> vs.Box:
    out = vs.Box()
    out.CopyFrom(box)
    validate.name("box", out.name)
    validate.name("box", out.provider, field="provider")
    validate.path("box", out.directory, field="directory")
    validate.resource_id("box", out.resource_id)
    if out.version in ("", "0"):
        out.version = DEFAULT_VERSION
    try:
        versions.parse_version(out.version)
    except versions.VersionError as exc:
        raise InvalidArgument(f"box version is invalid: {exc}") from None
    if not out.resource_id:
        existing = _row_by_key(conn, out.name, out.version, out.provider)
        out.resource_id = existing.resource_id if existing is not None else new_id()
    unique(
        conn,
        boxes,
        "box",
        "name, version and provider",
        sa.and_(
            boxes.c.name == out.name,
            boxes.c.version == out.version,
            boxes.c.provider == out.provider,
        ),
        out.resource_id,
    )
    out.last_update.CopyFrom(now)
    values: dict[str, object] = {
        "name": out.name,
        "version": out.version,
        "provider": out.provider,
        "data": serialize("box", out),
    }
    upsert_row(conn, boxes, "box", out.resource_id, values)
    return out


def box_get(conn: Connection, ref: sdk.Ref.Box) -> vs.Box:
    row = _row_by_ref(conn, ref)
    if row is None:
        raise NotFound(f"box not found: {_describe(ref)}")
    return vs.Box.FromString(row.data)


def box_delete(conn: Connection, ref: sdk.Ref.Box) -> bool:
    """Delete a box; deleting one that does not exist is not an error."""
    row = _row_by_ref(conn, ref)
    if row is None:
        return False
    conn.execute(sa.delete(boxes).where(boxes.c.resource_id == row.resource_id))
    return True


def box_list(conn: Connection) -> list[sdk.Ref.Box]:
    rows = sorted(
        conn.execute(
            sa.select(boxes.c.resource_id, boxes.c.name, boxes.c.version, boxes.c.provider)
        ),
        # By name and provider, then by version as versions (1.10 after 1.2), not as text.
        key=lambda r: (r.name, r.provider, _version_key(r.version)),
    )
    return [
        sdk.Ref.Box(resource_id=r.resource_id, name=r.name, version=r.version, provider=r.provider)
        for r in rows
    ]


def _version_key(text: str) -> tuple[int, versions.Version | str]:
    try:
        return (0, versions.parse_version(text))
    except versions.VersionError:
        return (1, text)


def box_find(conn: Connection, ref: sdk.Ref.Box) -> vs.Box | None:
    """The highest version of the named box matching `ref.version` as a constraint.

    None when nothing matches: upstream answers an empty response, not an error.
    """
    validate.required("box", "name", ref.name)
    try:
        constraint = versions.Constraints.parse(ref.version)
    except versions.VersionError as exc:
        raise InvalidArgument(f"box version constraint is invalid: {exc}") from None
    query = sa.select(boxes.c.version, boxes.c.data).where(boxes.c.name == ref.name)
    if ref.provider:
        query = query.where(boxes.c.provider == ref.provider)
    best: tuple[versions.Version, bytes] | None = None
    for row in conn.execute(query):
        try:
            version = versions.parse_version(row.version)
        except versions.VersionError:
            continue  # stored before validation existed; cannot match anything
        if constraint.check(version) and (best is None or version > best[0]):
            best = (version, row.data)
    return vs.Box.FromString(best[1]) if best is not None else None


def _row_by_ref(conn: Connection, ref: sdk.Ref.Box) -> Row[tuple[str, ...]] | None:
    if ref.resource_id:
        return conn.execute(sa.select(boxes).where(boxes.c.resource_id == ref.resource_id)).first()
    if not (ref.name and ref.provider):
        raise FailedPrecondition("box resource_id, or name and provider, is required")
    version = DEFAULT_VERSION if ref.version in ("", "0") else ref.version
    return _row_by_key(conn, ref.name, version, ref.provider)


def _row_by_key(
    conn: Connection, name: str, version: str, provider: str
) -> Row[tuple[str, ...]] | None:
    return conn.execute(
        sa.select(boxes).where(
            boxes.c.name == name, boxes.c.version == version, boxes.c.provider == provider
        )
    ).first()


def _describe(ref: sdk.Ref.Box) -> str:
    if ref.resource_id:
        return f"resource_id {ref.resource_id!r}"
    return f"{ref.name!r} version {ref.version or DEFAULT_VERSION!r} provider {ref.provider!r}"
