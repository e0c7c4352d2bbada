"""How the store reaches the database: engines, migrations, and transactions.

Every transaction is a plain synchronous function `fn(conn, *args)` that runs
whole without awaiting, so it costs at most one hop from the event loop to a
database thread however many statements it issues (awaiting each statement
through an async driver costs about ten times more on SQLite).

Writes are committed together, whatever transactions are waiting at once
(group commit): one fsync serves many RPCs, and each transaction still runs
inside its own SAVEPOINT, so one that fails rolls back alone. Every write has
committed before its awaitable returns: persist, then acknowledge.

SQLite allows one writer, in WAL mode so that readers never wait for it. A
batch's statements run on the event loop and only its commit (the fsync) on a
thread (`_LoopWriter`). PostgreSQL gets several writer threads that run whole
batches; rows that two replicas may contend for are locked by the
transactions themselves.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Concatenate, ParamSpec, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.pool import NullPool

from waystation.errors import WaystationError

log = logging.getLogger(__name__)

P = ParamSpec("P")
T = TypeVar("T")
TxFn = Callable[Concatenate[Connection, P], T]

# How many waiting transactions one commit may carry.
MAX_BATCH = 128
# How long a write waits for SQLite's lock held by another process.
BUSY_TIMEOUT_MS = 30_000
# Seconds a PostgreSQL connection attempt may take.
PG_CONNECT_TIMEOUT = 10


@dataclass
class _Work:
    fn: Callable[..., Any]
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    future: asyncio.Future[Any]
    loop: asyncio.AbstractEventLoop
    bulk: bool = False  # may take long: never on the event loop


Outcome = tuple[_Work, Any, BaseException | None]  # the work, its result, or why it failed
# Runs a batch on a thread's connection (perhaps replacing it): _commit_batch, _retry_singly.
BatchRun = Callable[[Connection, list[_Work]], tuple[Connection, list[Outcome]]]

_STOP = object()


def _pg_connect_args(url: str) -> dict[str, Any]:
    """A connection attempt to a host that drops packets would take minutes (the
    kernel's SYN retries, then nothing bounds the startup exchange): bounded,
    so that a start waiting for its database (store.connect) tries again, unless
    the URL or PGCONNECT_TIMEOUT says otherwise."""
    if "connect_timeout" in sa.make_url(url).query or os.environ.get("PGCONNECT_TIMEOUT"):
        return {}
    return {"connect_timeout": PG_CONNECT_TIMEOUT}


def normalize_url(url: str) -> str:
    """Accept the URLs people type: `postgresql://` means psycopg 3."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


class Database:
    """Engines plus the threads that run transactions on them."""

    def __init__(self, url: str, *, fsync: bool = True, readers: int = 4) -> None:
        self.url = normalize_url(url)
        self.dialect = sa.make_url(self.url).get_backend_name()
        self.fsync = fsync
        self._loop_writer: _LoopWriter | None = None
        if self.dialect == "sqlite":
            self._write_engine = self._sqlite_engine(immediate=True)
            self._read_engine = self._sqlite_engine(immediate=False)
            self._loop_writer = _LoopWriter(self._write_engine)
            writers = 0
            self._inline_reads = True
        elif self.dialect == "postgresql":
            writers = 4
            self._write_engine = sa.create_engine(
                self.url,
                pool_size=writers + readers,
                max_overflow=4,
                pool_pre_ping=True,
                connect_args=_pg_connect_args(self.url),
            )
            self._read_engine = self._write_engine
            self._inline_reads = False
            if not fsync:
                event.listen(self._write_engine, "connect", _pg_async_commit)
        else:
            raise ValueError(f"unsupported database URL {url!r}: use sqlite:/// or postgresql://")
        self._queue: queue.SimpleQueue[_Work | object] = queue.SimpleQueue()
        self._writers = [
            threading.Thread(target=self._writer_loop, name=f"db-writer-{i}", daemon=True)
            for i in range(writers)
        ]
        self._readers = ThreadPoolExecutor(max_workers=readers, thread_name_prefix="db-reader")
        self._inline_conn: Connection | None = None
        self._closed = False

    def _sqlite_engine(self, *, immediate: bool) -> Engine:
        # NullPool for the writer: it holds its one connection for its lifetime.
        engine = sa.create_engine(
            self.url,
            poolclass=NullPool if immediate else None,
            connect_args={"check_same_thread": False, "timeout": 30},
        )
        synchronous = "FULL" if self.fsync else "NORMAL"

        def on_connect(dbapi_conn: Any, _record: Any) -> None:
            # Take transaction control away from pysqlite so that BEGIN and
            # SAVEPOINT are ours (SQLAlchemy's documented recipe).
            dbapi_conn.isolation_level = None
            cur = dbapi_conn.cursor()
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute(f"PRAGMA synchronous={synchronous}")
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            cur.close()

        begin = "BEGIN IMMEDIATE" if immediate else "BEGIN"

        def on_begin(conn: Connection) -> None:
            # IMMEDIATE takes the write lock up front: no upgrade deadlocks.
            # Straight to the driver: this runs for every transaction.
            conn.connection.driver_connection.execute(begin)  # type: ignore[union-attr]

        event.listen(engine, "connect", on_connect)
        event.listen(engine, "begin", on_begin)
        return engine

    # -- lifecycle ---------------------------------------------------------

    def start(self) -> None:
        for thread in self._writers:
            thread.start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._loop_writer is not None:
            await self._loop_writer.close()
        for _ in self._writers:
            self._queue.put(_STOP)
        loop = asyncio.get_running_loop()
        for thread in self._writers:
            if thread.is_alive():
                await loop.run_in_executor(None, thread.join)
        self._readers.shutdown(wait=True)
        if self._inline_conn is not None:
            self._inline_conn.close()
        self._write_engine.dispose()
        self._read_engine.dispose()

    def run_sync(self, fn: Callable[[Connection], T]) -> T:
        """Run one transaction on the calling thread (start-up work only)."""
        with self._write_engine.connect() as conn, conn.begin():
            return fn(conn)

    # -- transactions ------------------------------------------------------

    async def write(self, fn: TxFn[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn(conn, *args)` in a write transaction; return after commit."""
        work = _Work(fn, args, kwargs, *_pending_on_loop())
        self._submit(work)
        result: T = await work.future
        return result

    async def write_bulk(self, fn: TxFn[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A write that may touch many rows (renewing every lease): never on the event loop."""
        work = _Work(fn, args, kwargs, *_pending_on_loop(), bulk=True)
        self._submit(work)
        result: T = await work.future
        return result

    def _submit(self, work: _Work) -> None:
        if self._closed:
            raise RuntimeError("database is closed")
        if self._loop_writer is not None:
            self._loop_writer.submit(work)
        else:
            self._queue.put(work)

    @property
    def reads_inline(self) -> bool:
        """Reads run on the event loop and cost microseconds (SQLite)."""
        return self._inline_reads

    async def read(self, fn: TxFn[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """Run `fn(conn, *args)` in a read-only snapshot.

        On SQLite this runs right here on the event loop: a WAL read never
        waits for the writer and takes microseconds, while a hop to a thread
        costs a GIL handoff (up to the switch interval) each way. Reads that
        may take long use `read_bulk`. PostgreSQL reads go to reader threads.
        """
        if self._inline_reads:
            return self._read_inline(fn, *args, **kwargs)
        return await self.read_bulk(fn, *args, **kwargs)

    def _read_inline(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # The event loop's own connection, kept: a pool checkout per read costs
        # more than the read. Reads here never await, so none interleave.
        conn = self._inline_conn
        if conn is None or conn.closed:
            conn = self._inline_conn = self._read_engine.connect()
        with conn.begin():
            return fn(conn, *args, **kwargs)

    async def read_bulk(self, fn: TxFn[P, T], *args: P.args, **kwargs: P.kwargs) -> T:
        """A read that may scan much (listing every job): always off the event loop."""
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(
            self._readers, functools.partial(self._read_sync, fn, *args, **kwargs)
        )

    def _read_sync(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        with self._read_engine.connect() as conn, conn.begin():
            return fn(conn, *args, **kwargs)

    def _writer_loop(self) -> None:
        conn = self._write_engine.connect()
        try:
            while True:
                first = self._queue.get()
                if first is _STOP:
                    return
                batch = [first]
                while len(batch) < MAX_BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if item is _STOP:
                        self._queue.put(_STOP)  # finish this batch, then stop
                        break
                    batch.append(item)
                conn, outcomes = _commit_batch(conn, [w for w in batch if isinstance(w, _Work)])
                _settle_threadsafe(outcomes)
        finally:
            conn.close()


class _LoopWriter:
    """SQLite's writer: a batch's statements run on the event loop, its commit on a thread.

    On a writer thread every statement releases the GIL around SQLite and then
    waits to take it back from the busy event loop: measured, two thirds of
    that thread's time went to such waits, and each write took about 10 ms to
    come back. On the loop a statement costs only its CPU (tens of
    microseconds); the one wait left per batch is the commit's fsync, on a
    thread so that the loop serves RPCs meanwhile. The connection belongs to
    whichever side holds the batch, never both. Bulk writes, and any batch
    that cannot start at once (another process holds the lock), run whole on
    that thread as every write used to.
    """

    def __init__(self, engine: Engine) -> None:
        self._engine = engine
        self._conn: Connection | None = None
        self._pending: collections.deque[_Work] = collections.deque()
        self._busy = False  # a batch is out: the connection is not the loop's
        self._idle = asyncio.Event()
        self._idle.set()
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="db-commit")

    def submit(self, work: _Work) -> None:
        self._pending.append(work)
        if not self._busy:
            self._busy = True
            self._idle.clear()
            # Next loop pass, so that the writes issued in this one share a commit.
            work.loop.call_soon(self._next)

    async def close(self) -> None:
        await self._idle.wait()
        await asyncio.get_running_loop().run_in_executor(self._thread, self._close_conn)
        self._thread.shutdown(wait=True)

    def _close_conn(self) -> None:
        if self._conn is not None:
            self._conn.close()

    def _connection(self) -> Connection:
        if self._conn is None or self._conn.closed:
            self._conn = self._engine.connect()
            # The loop must never block on a lock: BEGIN fails at once instead
            # (and the batch goes to the thread, which waits as long as it takes).
            _driver(self._conn, "PRAGMA busy_timeout=0")
        return self._conn

    def _next(self) -> None:
        if not self._pending:
            self._busy = False
            self._idle.set()
            return
        loop = self._pending[0].loop
        batch = [self._pending.popleft()]
        if not batch[0].bulk:
            while self._pending and len(batch) < MAX_BATCH and not self._pending[0].bulk:
                batch.append(self._pending.popleft())
            conn = self._connection()
            try:
                conn.begin()
                outcomes = _run_batch(conn, batch)
            except Exception as exc:  # the thread rolls it back and runs it whole
                log.info("batch of %d moves to the commit thread (%s)", len(batch), exc)
            else:
                if not conn.in_transaction():  # a lone one failed and rolled back
                    loop.call_soon(self._committed, batch, outcomes, None)
                    return
                done = loop.run_in_executor(self._thread, conn.commit)
                done.add_done_callback(lambda f: self._committed(batch, outcomes, f.exception()))
                return
        self._to_thread(_commit_batch, batch)

    def _to_thread(self, run: BatchRun, batch: list[_Work]) -> None:
        done = batch[0].loop.run_in_executor(self._thread, self._on_thread, run, batch)
        done.add_done_callback(lambda _: self._next())

    def _committed(
        self, batch: list[_Work], outcomes: list[Outcome], failed: BaseException | None
    ) -> None:
        if failed is None:
            for work, result, error in outcomes:
                _settle(work.future, result, error)
            self._next()
        else:  # nothing of the batch is stored: each runs again, alone
            log.warning("group commit of %d failed (%s); retrying singly", len(batch), failed)
            self._to_thread(_retry_singly, batch)

    def _on_thread(self, run: BatchRun, batch: list[_Work]) -> None:
        try:
            conn = _reconnect(self._connection())  # whatever the loop left open, undone
            _driver(conn, f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
            conn, outcomes = run(conn, batch)
            _driver(conn, "PRAGMA busy_timeout=0")
            self._conn = conn
        except Exception as exc:  # no database to reach: every caller hears why
            log.exception("writing a batch of %d failed", len(batch))
            outcomes = [(work, None, exc) for work in batch]
        _settle_threadsafe(outcomes)


def _pending_on_loop() -> tuple[asyncio.Future[Any], asyncio.AbstractEventLoop]:
    loop = asyncio.get_running_loop()
    return loop.create_future(), loop


def _run_batch(conn: Connection, batch: list[_Work]) -> list[Outcome]:
    """Run a batch's transactions in the open transaction; failures roll back alone."""
    if len(batch) == 1:  # alone: the transaction itself is its savepoint
        return [_run_alone(conn, batch[0])]
    return [_run_in_savepoint(conn, work, alone=False) for work in batch]


def _commit_batch(conn: Connection, batch: list[_Work]) -> tuple[Connection, list[Outcome]]:
    """Run and commit a batch on this thread, the connection perhaps replaced."""
    try:
        with conn.begin():
            return conn, _run_batch(conn, batch)
    except Exception as exc:  # the commit itself failed: retry one by one
        if not _transient(exc):
            log.warning("group commit of %d failed (%s); retrying singly", len(batch), exc)
        return _retry_singly(_reconnect(conn), batch)


def _retry_singly(conn: Connection, batch: list[_Work]) -> tuple[Connection, list[Outcome]]:
    outcomes = []
    for work in batch:
        try:
            with conn.begin():
                outcome = _run_in_savepoint(conn, work)
        except Exception as single_exc:
            outcome = (work, None, single_exc)
            conn = _reconnect(conn)
        outcomes.append(outcome)
    return conn, outcomes


def _settle_threadsafe(outcomes: list[Outcome]) -> None:
    for work, result, error in outcomes:
        work.loop.call_soon_threadsafe(_settle, work.future, result, error)


# PostgreSQL's deadlock_detected and serialization_failure: the transaction
# lost a race with another writer's batch (several writers hold row locks
# until their batch commits, in no common order) and may simply run again.
_TRANSIENT = frozenset({"40P01", "40001"})
_ATTEMPTS = 5


def _transient(exc: BaseException) -> bool:
    return getattr(getattr(exc, "orig", None), "sqlstate", None) in _TRANSIENT


def _run_in_savepoint(conn: Connection, work: _Work, *, alone: bool = True) -> Outcome:
    for attempt in range(1, _ATTEMPTS + 1):
        # Straight to the driver: SQLAlchemy's begin_nested costs more than
        # most of the transactions it would wrap.
        _driver(conn, "SAVEPOINT ws_work")
        try:
            result = work.fn(conn, *work.args, **work.kwargs)
        except Exception as exc:
            while conn.in_nested_transaction():  # the transaction's own, left open
                conn.get_nested_transaction().rollback()  # type: ignore[union-attr]
            _driver(conn, "ROLLBACK TO SAVEPOINT ws_work")  # also releases its locks
            _driver(conn, "RELEASE SAVEPOINT ws_work")
            if _transient(exc) and not alone:
                # The batch's other transactions still hold the locks the winner
                # waits for: give them all up, then run each on its own.
                raise
            if _transient(exc) and attempt < _ATTEMPTS:
                log.info("transaction %s lost a lock race; retrying", _name(work))
                time.sleep(0.002 * attempt)
                continue
            if not isinstance(exc, WaystationError):
                log.exception("transaction %s failed", _name(work))
            return work, None, exc
        _driver(conn, "RELEASE SAVEPOINT ws_work")
        return work, result, None
    raise AssertionError("unreachable")


def _driver(conn: Connection, sql: str) -> None:
    conn.connection.dbapi_connection.cursor().execute(sql)  # type: ignore[union-attr]


def _run_alone(conn: Connection, work: _Work) -> Outcome:
    try:
        return work, work.fn(conn, *work.args, **work.kwargs), None
    except Exception as exc:
        if _transient(exc):
            raise  # the batch path retries it in a savepoint
        conn.rollback()
        if not isinstance(exc, WaystationError):
            log.exception("transaction %s failed", _name(work))
        return work, None, exc


def _name(work: _Work) -> str:
    return str(getattr(work.fn, "__name__", work.fn))


def _reconnect(conn: Connection) -> Connection:
    if not conn.invalidated and not conn.closed:
        try:
            conn.rollback()
            # SQLAlchemy forgets a transaction whose COMMIT failed, but SQLite
            # keeps it open (a deferred constraint, a full disk): end it there.
            conn.connection.dbapi_connection.rollback()  # type: ignore[union-attr]
            return conn
        except Exception:
            log.exception("connection unusable; reconnecting")
    engine = conn.engine
    conn.close()
    return engine.connect()


def _settle(future: asyncio.Future[Any], result: Any, error: BaseException | None) -> None:
    if future.cancelled():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


def _pg_async_commit(dbapi_conn: Any, _record: Any) -> None:
    # fsync off on PostgreSQL: commits return before the WAL reaches disk.
    with dbapi_conn.cursor() as cur:
        cur.execute("SET synchronous_commit = off")
    dbapi_conn.commit()
