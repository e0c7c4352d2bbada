"""The transaction runner: group commit, isolation of failures, schema migrations."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy.engine import Connection

from waystation.core.settings import sqlite_url
from waystation.errors import AlreadyExists, WaystationError
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store import Store
from waystation.store import jobs as job_tx
from waystation.store import runners as runner_tx
from waystation.store.migrate import alembic_config
from waystation.store.prepared import Prepared
from waystation.store.schema import bases, jobs, metadata, projects, runners


def _insert(conn: Connection, name: str, fail: bool) -> str:
    conn.execute(
        sa.insert(bases).values(
            resource_id=name, name=name, name_key=name, path=f"/{name}", data=b""
        )
    )
    if fail:
        raise AlreadyExists(f"{name} fails after writing")
    return name


def _names(conn: Connection) -> set[str]:
    return set(conn.execute(sa.select(bases.c.name)).scalars())


async def test_a_failing_transaction_rolls_back_alone_within_a_group(backend_url: str) -> None:
    store = await asyncio.to_thread(Store.open, backend_url)
    try:
        results = await asyncio.gather(
            *(store._db.write(_insert, f"b{i}", i % 5 == 0) for i in range(60)),
            return_exceptions=True,
        )
        failed = {f"b{i}" for i in range(60) if i % 5 == 0}
        assert all(isinstance(results[i], AlreadyExists) for i in range(0, 60, 5))
        assert {r for r in results if isinstance(r, str)} == {f"b{i}" for i in range(60)} - failed
        assert await store._db.read(_names) == {f"b{i}" for i in range(60)} - failed
    finally:
        await store.close()


def _boom(conn: Connection) -> None:
    conn.execute(sa.text("SELECT * FROM no_such_table"))


async def test_a_database_error_reaches_the_caller_and_the_writer_survives(
    backend_url: str,
) -> None:
    store = await asyncio.to_thread(Store.open, backend_url)
    try:
        with pytest.raises(
            sa.exc.ProgrammingError if "postgres" in backend_url else sa.exc.OperationalError
        ):
            await store._db.write(_boom)
        assert await store._db.write(_insert, "after", False) == "after"
        assert not isinstance(await store._db.read(_names), WaystationError)
    finally:
        await store.close()


async def test_close_finishes_queued_writes(backend_url: str) -> None:
    store = await asyncio.to_thread(Store.open, backend_url)
    pending = [asyncio.ensure_future(store._db.write(_insert, f"c{i}", False)) for i in range(30)]
    await asyncio.sleep(0)
    await store.close()
    assert [await p for p in pending] == [f"c{i}" for i in range(30)]
    reopened = await asyncio.to_thread(Store.open, backend_url)
    try:
        assert await reopened._db.read(_names) == {f"c{i}" for i in range(30)}
    finally:
        await reopened.close()


def _thread(conn: Connection) -> threading.Thread:
    return threading.current_thread()


async def test_sqlite_statements_run_on_the_event_loop_and_bulk_writes_off_it(
    backend_url: str,
) -> None:
    """On SQLite a write's statements run on the loop (a thread would wait for the
    GIL after each one) and only its commit on a thread; a bulk write runs whole
    on a thread. PostgreSQL's statements cross the network: always on threads."""
    store = await asyncio.to_thread(Store.open, backend_url)
    try:
        loop_thread = threading.current_thread()
        on_loop = backend_url.startswith("sqlite")
        assert (await store._db.write(_thread) is loop_thread) == on_loop
        assert await store._db.write_bulk(_thread) is not loop_thread
        # Interleaved, every write still lands, in order.
        results = await asyncio.gather(
            *(
                (store._db.write_bulk if i % 3 == 0 else store._db.write)(_insert, f"m{i}", False)
                for i in range(30)
            )
        )
        assert results == [f"m{i}" for i in range(30)]
        assert await store._db.read(_names) == set(results)
    finally:
        await store.close()


async def test_a_sqlite_write_waits_for_another_process_lock_without_stalling_the_loop(
    tmp_path: Path,
) -> None:
    path = tmp_path / "locked.db"
    store = await asyncio.to_thread(Store.open, sqlite_url(path))
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    try:
        other.execute("BEGIN IMMEDIATE")  # as another process writing would
        pending = asyncio.ensure_future(store._db.write(_insert, "late", False))
        for _ in range(5):  # the loop goes on serving while the write waits
            await asyncio.sleep(0.05)
            assert await store._db.read(_names) == set()
        assert not pending.done()
        other.execute("COMMIT")
        assert await asyncio.wait_for(pending, 60) == "late"
        assert await store._db.write(_insert, "next", False) == "next"
        assert await store._db.read(_names) == {"late", "next"}
    finally:
        other.close()
        await store.close()


def _orphan(conn: Connection) -> None:
    # A deferred foreign key: the statement passes, the COMMIT fails.
    conn.exec_driver_sql("PRAGMA defer_foreign_keys=ON")
    conn.execute(
        sa.insert(projects).values(
            resource_id="p", basis_id="none", name="p", name_key="p", path="/p", data=b""
        )
    )


async def test_a_failed_sqlite_group_commit_runs_each_transaction_again_alone(
    tmp_path: Path,
) -> None:
    store = await asyncio.to_thread(Store.open, sqlite_url(tmp_path / "w.db"))
    try:
        results = await asyncio.gather(
            store._db.write(_insert, "before", False),
            store._db.write(_orphan),
            store._db.write(_insert, "after", False),
            return_exceptions=True,
        )
        assert results[0] == "before" and results[2] == "after"
        assert isinstance(results[1], sa.exc.IntegrityError)
        assert await store._db.read(_names) == {"before", "after"}
        assert await store._db.write(_insert, "again", False) == "again"
    finally:
        await store.close()


def test_migrations_match_the_schema_and_downgrade_cleanly(backend_url: str) -> None:
    store = Store.open(backend_url)
    try:

        def check(conn: Connection) -> None:
            diff = compare_metadata(MigrationContext.configure(conn), metadata)
            assert diff == [], f"schema.py and migrations differ: {diff}"
            command.downgrade(alembic_config(conn), "base")
            assert "bases" not in sa.inspect(conn).get_table_names()
            command.upgrade(alembic_config(conn), "head")
            assert compare_metadata(MigrationContext.configure(conn), metadata) == []

        store._db.run_sync(check)
    finally:
        asyncio.run(store.close())


def test_upgrade_gives_held_jobs_the_id_their_runner_registered(backend_url: str) -> None:
    """Migration 0005 upgrades a database in place: a job held before it says
    which runner holds it as that runner registered, not lowercased (and 0007,
    which renames the columns, keeps both)."""
    store = Store.open(backend_url)
    try:

        def check(conn: Connection) -> None:
            command.downgrade(alembic_config(conn), "0004")
            runner = vs.Runner(id="WSCheck-Runner-1")
            conn.execute(
                sa.insert(runners).values(
                    id="wscheck-runner-1",
                    by_id_only=False,
                    first_seen=1,
                    last_seen=1,
                    data=runner.SerializeToString(),
                )
            )
            old_jobs = sa.table(  # the 0004 columns that matter
                "jobs",
                *(
                    sa.column(name)
                    for name in ("id", "kind", "state", "operation", "queue_time", "data")
                ),
                sa.column("assigned_runner"),
            )
            for job_id, holder in (("held", "wscheck-runner-1"), ("queued", None)):
                conn.execute(
                    sa.insert(old_jobs).values(
                        id=job_id,
                        kind="vagrant",
                        state=3 if holder else 1,
                        operation="noop",
                        queue_time=1,
                        data=b"",
                        assigned_runner=holder,
                    )
                )
            command.upgrade(alembic_config(conn), "head")
            rows = conn.execute(sa.select(jobs.c.id, jobs.c.holder_key, jobs.c.holder_id))
            assert sorted(rows) == [
                ("held", "wscheck-runner-1", "WSCheck-Runner-1"),
                ("queued", None, None),
            ]
            assert job_tx.job_get(conn, "held").assigned_runner.id == "WSCheck-Runner-1"

        store._db.run_sync(check)
    finally:
        asyncio.run(store.close())


# -- prepared statements (store.prepared): the hot path's driver-level execution --

_PUT = Prepared(
    sa.insert(bases).values(
        resource_id=sa.bindparam("name"),
        name=sa.bindparam("name"),
        name_key=sa.bindparam("name"),
        path=sa.bindparam("path"),
        data=b"fixed",
    )
)
_DATA = Prepared(sa.select(bases.c.data).where(bases.c.name == sa.bindparam("name")))


def _put_twice_in_savepoint(conn: Connection, name: str) -> None:
    _PUT.run(conn, name=name, path=f"/{name}")
    conn.begin_nested()  # left open on purpose: the writer must clean it up
    _PUT.run(conn, name=name, path=f"/{name}/2")


async def test_prepared_statements_raise_sqlalchemy_errors_and_roll_back_alone(
    backend_url: str,
) -> None:
    store = await asyncio.to_thread(Store.open, backend_url)
    try:
        results = await asyncio.gather(
            store._db.write(lambda conn: _PUT.run(conn, name="kept", path="/k") and None),
            store._db.write(_put_twice_in_savepoint, "dup"),
            store._db.write(lambda conn: _PUT.run(conn, name="after", path="/a") and None),
            return_exceptions=True,
        )
        assert results[0] is None and results[2] is None, results
        assert isinstance(results[1], sa.exc.IntegrityError), results[1]
        assert await store._db.read(_names) == {"kept", "after"}
        # Values written into the statement (data) travel with the caller's.
        assert await store._db.read(lambda conn: _DATA.one(conn, name="kept")) == (b"fixed",)
        assert await store._db.read(lambda conn: _DATA.one(conn, name="gone")) is None
    finally:
        await store.close()


async def test_prepared_statements_refuse_in_lists_that_expand_at_execution(
    backend_url: str,
) -> None:
    expanding = Prepared(sa.select(bases.c.name).where(bases.c.name.in_(["a", "b"])))
    store = await asyncio.to_thread(Store.open, backend_url)
    try:
        with pytest.raises(ValueError, match="IN"):
            await store._db.read(lambda conn: expanding.all(conn))
    finally:
        await store.close()


def _register_many(conn: Connection, count: int) -> None:
    rows = [
        {"id": f"r-{i}", "by_id_only": False, "first_seen": 1, "last_seen": 1, "data": b""}
        for i in range(count)
    ]
    conn.execute(sa.insert(runners), rows)


def _leases(conn: Connection) -> list[int]:
    return list(conn.execute(sa.select(runners.c.online_until)).scalars())


async def test_renewing_more_runners_than_one_statement_may_name(backend_url: str) -> None:
    """A statement takes at most 65,535 parameters on PostgreSQL (32,766 on many
    SQLite builds): leases renew in slices."""
    store = await asyncio.to_thread(Store.open, backend_url)
    try:
        count = 66_000
        await store._db.write(_register_many, count)
        ids = [f"R-{i}" for i in range(count)]  # any case: ids match ignoring it
        await store._db.write(runner_tx.runners_renew, ids, 1000, 60)
        assert await store._db.read(_leases) == [1060] * count
    finally:
        await store.close()
