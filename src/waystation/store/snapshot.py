"""Snapshots of the whole store, in Waypoint's snapshot encoding.

A snapshot is gzip over uvarint-length-delimited `Snapshot` messages: the
Header, then BoltChunks, the last with `final` set, then a Trailer whose
sha256 covers every uncompressed byte before it (length prefixes included).
Upstream's chunks carry BoltDB buckets; ours carry tables: `bucket` is a
table's name, each item a row under its primary key (a JSON array), its
value the row as a JSON object (bytes as {"b64": ...}). The first chunk,
bucket `waystation.snapshot`, says so and names the schema revision, so a
snapshot is read back only by a server whose schema is the same.

Rows are backend-neutral: a snapshot of SQLite restores into PostgreSQL and
back. Restores are applied at start (staged by the RestoreSnapshot RPC), in
one transaction that replaces every row of every table.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import json
import logging
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import sqlalchemy as sa
from alembic.migration import MigrationContext
from google.protobuf.message import DecodeError
from sqlalchemy.engine import Connection

from waystation.errors import InvalidArgument
from waystation.files import PRIVATE_FILE
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store.database import Database
from waystation.store.schema import metadata

log = logging.getLogger(__name__)

Snapshot = vs.Snapshot
META = "waystation.snapshot"
ENCODING = b"tables-json-v1"
CHUNK_ROWS = 500
MAX_MESSAGE = 64 * 1024 * 1024  # a length prefix above this is corruption, not data


def write(conn: Connection, out: IO[bytes], version: vs.VersionInfo) -> None:
    """Every row of every table, as one consistent snapshot, gzip'd into `out`."""
    if conn.dialect.name == "postgresql":  # one view of every table
        conn.exec_driver_sql("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
    digest = hashlib.sha256()
    with gzip.GzipFile(fileobj=out, mode="wb", mtime=0) as zipped:

        def emit(message: Any, counted: bool = True) -> None:
            data = message.SerializeToString()
            framed = _uvarint(len(data)) + data
            if counted:
                digest.update(framed)
            zipped.write(framed)

        emit(Snapshot.Header(version=version, format=Snapshot.Header.BOLT))
        meta = {"encoding": ENCODING, "revision": _revision(conn).encode()}
        emit(Snapshot.BoltChunk(bucket=META, items=meta))
        for table in metadata.sorted_tables:
            key = list(table.primary_key.columns)
            # A server-side cursor on PostgreSQL: a table's rows never all in memory.
            query = sa.select(table).order_by(*key).execution_options(yield_per=CHUNK_ROWS)
            for chunk in conn.execute(query).mappings().partitions():
                items = {_key(row, key): _encode(row) for row in chunk}
                emit(Snapshot.BoltChunk(bucket=table.name, items=items))
        emit(Snapshot.BoltChunk(final=True))
        emit(Snapshot.Trailer(sha256=digest.hexdigest()), counted=False)


def staged(data_dir: Path) -> Path:
    """Where a restore waits for the next start: in the server's data directory."""
    return data_dir / "restore.snapshot"


def verify_file(conn: Connection, path: Path) -> int:
    """Check that the file is a whole snapshot this database can take, reading it
    once without holding it (InvalidArgument says what is wrong); its rows."""
    tables = {t.name: (i, t) for i, t in enumerate(metadata.sorted_tables)}
    current = _revision(conn)
    meta: dict[str, bytes] = {}
    last, rows = -1, 0
    for bucket, items in _table_chunks(path, meta):
        if meta.get("revision", b"").decode() != current:
            revision = meta.get("revision", b"").decode()
            raise InvalidArgument(
                f"snapshot: its schema revision {revision!r} is not this server's"
                f" ({current!r}); restore it with the waystation version that made it"
            )
        if bucket not in tables:
            raise InvalidArgument(f"snapshot: unknown table {bucket!r}")
        index, table = tables[bucket]
        if index < last:  # parents before children, or the inserts break foreign keys
            raise InvalidArgument(f"snapshot: table {bucket} out of order")
        last = index
        unknown = {column for row in items for column in row} - set(table.columns.keys())
        if unknown:
            raise InvalidArgument(f"snapshot: unknown columns of {bucket}: {sorted(unknown)}")
        rows += len(items)
    return rows


def restore(conn: Connection, path: Path) -> int:
    """Replace every row of every table with the snapshot's, chunk by chunk
    (verify_file first, in the same transaction); the rows restored."""
    for table in reversed(metadata.sorted_tables):
        conn.execute(table.delete())
    tables = {t.name: t for t in metadata.sorted_tables}
    restored = 0
    for bucket, items in _table_chunks(path, {}):
        conn.execute(tables[bucket].insert(), items)
        restored += len(items)
    return restored


def _table_chunks(path: Path, meta: dict[str, bytes]) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """(table, rows) of each data chunk, in order; `meta` gets the first chunk's
    items before any is yielded. The checksum is checked after the last."""
    digest = hashlib.sha256()
    try:
        with path.open("rb") as source, gzip.GzipFile(fileobj=source, mode="rb") as zipped:
            header = _next(zipped, Snapshot.Header(), digest)
            if header is None or header.format != Snapshot.Header.BOLT:
                raise InvalidArgument("snapshot: no header of the BOLT format")
            while True:
                chunk = _next(zipped, Snapshot.BoltChunk(), digest)
                if chunk is None:
                    raise InvalidArgument("snapshot: it ends before its final chunk")
                if chunk.bucket == META:
                    meta.update(chunk.items)
                elif chunk.bucket:
                    if meta.get("encoding") != ENCODING:
                        raise InvalidArgument("snapshot: not a waystation snapshot")
                    yield chunk.bucket, [_decode(value) for value in chunk.items.values()]
                if chunk.final:
                    break
            expected = digest.hexdigest()
            trailer = _next(zipped, Snapshot.Trailer(), None)
            if trailer is None or trailer.sha256 != expected:
                raise InvalidArgument("snapshot: checksum mismatch (corrupt or truncated)")
            if zipped.read(1):
                raise InvalidArgument("snapshot: data after its trailer")
    except (OSError, EOFError, ValueError, KeyError, TypeError, DecodeError, zlib.error) as exc:
        raise InvalidArgument(f"snapshot: unreadable ({exc})") from None
    if meta.get("encoding") != ENCODING:
        raise InvalidArgument("snapshot: not a waystation snapshot")


def _revision(conn: Connection) -> str:
    return MigrationContext.configure(conn).get_current_revision() or ""


def _key(row: Any, key: list[sa.Column[Any]]) -> str:
    return json.dumps([row[column.name] for column in key], separators=(",", ":"))


def _encode(row: Any) -> bytes:
    values = {
        name: {"b64": base64.b64encode(value).decode()} if isinstance(value, bytes) else value
        for name, value in row.items()
    }
    return json.dumps(values, separators=(",", ":")).encode()


def _decode(value: bytes) -> dict[str, Any]:
    row = json.loads(value)
    if not isinstance(row, dict):
        raise ValueError("a row is not a JSON object")
    return {
        name: base64.b64decode(v["b64"]) if isinstance(v, dict) else v for name, v in row.items()
    }


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _next(stream: gzip.GzipFile, message: Any, digest: Any) -> Any:
    """The next delimited message parsed into `message`; None at the end."""
    prefix = bytearray()
    length = shift = 0
    while True:
        byte = stream.read(1)
        if not byte:
            if prefix:
                raise ValueError("truncated length prefix")
            return None
        prefix += byte
        length |= (byte[0] & 0x7F) << shift
        if not byte[0] & 0x80:
            break
        shift += 7
        if shift > 63:
            raise ValueError("bad length prefix")
    if length > MAX_MESSAGE:
        raise ValueError(f"a message of {length} bytes")
    data = stream.read(length)
    if len(data) != length:
        raise ValueError("truncated message")
    if digest is not None:
        digest.update(bytes(prefix) + data)
    message.ParseFromString(data)
    return message


def apply_staged(db: Database, data_dir: Path) -> None:
    """At start: a snapshot staged by RestoreSnapshot replaces the whole store,
    once. One that cannot be applied stops the start (OSError)."""
    path = staged(data_dir)
    if not path.exists():
        return
    log.warning("restoring the store from %s", path)

    def apply(conn: Connection) -> int:
        verify_file(conn, path)  # before the first delete: a bad file changes nothing
        return restore(conn, path)

    try:
        rows = db.run_sync(apply)
    except InvalidArgument as exc:
        raise OSError(f"cannot restore {path}: {exc.message}; move it away to start") from None
    except sa.exc.IntegrityError as exc:  # rows that contradict each other: nothing changed
        raise OSError(
            f"cannot restore {path}: its rows break the schema's constraints ({exc.orig});"
            " move it away to start"
        ) from None
    applied = path.with_name(path.name + ".applied")
    path.replace(applied)
    applied.chmod(PRIVATE_FILE)  # kept beside the database: as secret as it, if copied in by hand
    log.warning("store restored: %d rows; %s renamed to .applied", rows, path.name)
