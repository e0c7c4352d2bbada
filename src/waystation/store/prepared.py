"""Statements of the hot path: written in SQLAlchemy Core, compiled once per
dialect, run straight on the driver's cursor.

A Core `conn.execute` costs 100-700 us on a small CPU (building the statement,
its cache key, the result wrapper); the driver itself takes about 10 us on
SQLite. Every job passes through queue, assign, ack and complete, so those
statements take this path (profile in bench/NOTES.md); everything else stays
plain Core. The SQL is still SQLAlchemy's, for either backend; only the
execution is the driver's, inside the transaction the Connection began.

Only for columns whose values the drivers take and give as they are (text,
integers, bytes): no type processing happens here.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection


class _Compiled(NamedTuple):
    sql: str
    order: tuple[str, ...] | None  # bind names in order, for positional drivers
    defaults: dict[str, Any]  # the values written into the statement itself


class Prepared:
    """One statement with `sa.bindparam` placeholders; `run(conn, name=value)`."""

    def __init__(self, statement: sa.ClauseElement) -> None:
        self.statement = statement
        self._by_dialect: dict[str, _Compiled] = {}

    def _compile(self, conn: Connection) -> _Compiled:
        dialect = conn.dialect
        compiled = self._by_dialect.get(dialect.name)
        if compiled is None:
            result: Any = self.statement.compile(dialect=dialect)  # an SQLCompiler
            if "POSTCOMPILE" in result.string:
                raise ValueError("IN (...) expands at execution: write it as OR of equalities")
            order = tuple(result.positiontup or ()) if result.positional else None
            defaults = {
                name: bind.effective_value
                for name, bind in result.binds.items()
                if not bind.required
            }
            compiled = _Compiled(result.string, order, defaults)
            self._by_dialect[dialect.name] = compiled
        return compiled

    def run(self, conn: Connection, **params: Any) -> Any:
        """Execute; the DBAPI cursor, for fetchone/fetchall/rowcount."""
        compiled = self._compile(conn)
        args = _arguments(compiled, params)
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.execute(compiled.sql, args)
        except conn.dialect.loaded_dbapi.Error as exc:
            raise _wrap(conn, compiled.sql, args, exc) from exc
        return cursor

    def run_many(self, conn: Connection, rows: list[dict[str, Any]]) -> None:
        """Execute once per row of parameters (the driver's executemany)."""
        compiled = self._compile(conn)
        args = [_arguments(compiled, row) for row in rows]
        cursor = conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
        try:
            cursor.executemany(compiled.sql, args)
        except conn.dialect.loaded_dbapi.Error as exc:
            raise _wrap(conn, compiled.sql, args, exc) from exc
        cursor.close()

    def one(self, conn: Connection, **params: Any) -> tuple[Any, ...] | None:
        cursor = self.run(conn, **params)
        row: tuple[Any, ...] | None = cursor.fetchone()
        cursor.close()
        return row

    def all(self, conn: Connection, **params: Any) -> list[tuple[Any, ...]]:
        cursor = self.run(conn, **params)
        rows: list[tuple[Any, ...]] = cursor.fetchall()
        cursor.close()
        return rows

    def count(self, conn: Connection, **params: Any) -> int:
        """Rows the statement changed."""
        cursor = self.run(conn, **params)
        changed = int(cursor.rowcount)
        cursor.close()
        return changed


def _arguments(compiled: _Compiled, params: dict[str, Any]) -> Any:
    values = {**compiled.defaults, **params} if compiled.defaults else params
    return values if compiled.order is None else [values[k] for k in compiled.order]


def _wrap(conn: Connection, sql: str, args: Any, exc: Any) -> sa.exc.StatementError:
    """The SQLAlchemy exception `conn.execute` would raise (IntegrityError, ...),
    so callers and the writer's retry rules see one kind of error."""
    dialect = conn.dialect
    dbapi_conn = conn.connection.dbapi_connection
    invalidated = dialect.is_disconnect(exc, dbapi_conn, None)
    if invalidated:
        conn.invalidate(exc)
    wrapped: sa.exc.StatementError = sa.exc.DBAPIError.instance(
        sql,
        args,
        exc,
        dialect.loaded_dbapi.Error,
        connection_invalidated=invalidated,
        dialect=dialect,
    )
    return wrapped
