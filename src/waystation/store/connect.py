"""Reaching the database at start: the URLs we take, and waiting for a PostgreSQL
that is not up yet (a service started with, or before, its database).

Each failed attempt is one log line naming the database (never its password)
and why; attempts back off 1, 2, 4, 8 then 15 s apart until the wait runs out,
and then one error. A server that answers and refuses us for good (no such
database or role, a wrong password) is not retried: waiting will not fix it.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections.abc import Awaitable, Callable

import sqlalchemy as sa

from waystation.store import Store
from waystation.store.database import normalize_url

log = logging.getLogger(__name__)

FIRST_DELAY = 1.0
MAX_DELAY = 15.0
# What a PostgreSQL answers while it cannot take us yet but soon will.
_TRANSIENT = (
    "starting up",
    "shutting down",
    "in recovery mode",
    "too many clients",
    "remaining connection slots",
)
# scheme (after postgresql:// became psycopg's) -> backend we run on
_SUPPORTED = {"sqlite", "sqlite+pysqlite", "postgresql+psycopg"}


class UnsupportedDatabase(ValueError):
    """A database URL we cannot use: not SQLite or PostgreSQL, or not a URL."""


class DatabaseUnreachable(ConnectionError):
    """No connection to the database: after waiting, or refused for good."""


def redact(url: str) -> str:
    """The URL to show people: without its password (in userinfo or the query)."""
    try:
        parsed = sa.make_url(url)
    except sa.exc.ArgumentError:
        return re.sub(r"(//[^/:@]*):[^@/]*@", r"\1@", url)
    query = {k: v for k, v in parsed.query.items() if k.lower() != "password"}
    # URL.set() reads password=None as "unchanged".
    without = parsed.set(query=query)._replace(password=None)
    return without.render_as_string(hide_password=False)


def check_url(url: str) -> None:
    """UnsupportedDatabase unless `url` is one we can open (nothing is opened)."""
    try:
        scheme = sa.make_url(normalize_url(url)).drivername
    except sa.exc.ArgumentError:
        scheme = ""
    if scheme not in _SUPPORTED:
        raise UnsupportedDatabase(
            f"unsupported database URL {redact(url)!r}: use sqlite:///PATH or postgresql://..."
        )


def reason(exc: BaseException) -> str:
    """Why a connection failed, in one line: psycopg's message is several, each
    prefixed with where it tried ("connection to server at ..., port ... failed:")."""
    text = str(getattr(exc, "orig", None) or exc)
    found: list[str] = []
    for line in text.splitlines():
        line = line.strip().removeprefix("- ")
        if not line or line.startswith(("Is the server", "Multiple connection attempts")):
            continue
        line = line.rpartition(" failed: ")[2] if " failed: " in line else line
        line = line.removeprefix("FATAL:").strip()
        line = line[:1].lower() + line[1:]
        if line not in found:
            found.append(line)
    return "; ".join(found) or type(exc).__name__


def retryable(url: str, exc: BaseException) -> bool:
    """A PostgreSQL that did not answer, or answered that it will soon take us."""
    if not isinstance(exc, sa.exc.OperationalError):
        return False
    if sa.make_url(normalize_url(url)).get_backend_name() != "postgresql":
        return False  # a SQLite file does not come up by waiting
    text = str(exc.orig)
    return "FATAL:" not in text or any(marker in text for marker in _TRANSIENT)


async def open_store(
    url: str,
    *,
    fsync: bool = True,
    wait: float = 60.0,
    opener: Callable[[str, bool], Store] | None = None,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
) -> Store:
    """Store.open, retried while a PostgreSQL refuses connections, for up to `wait`
    seconds (`opener`, `sleep` and `clock` are there for tests)."""
    check_url(url)
    shown = redact(url)
    deadline = clock() + wait
    delay = FIRST_DELAY
    attempt = 0
    while True:
        attempt += 1
        try:
            if opener is not None:
                return await asyncio.to_thread(opener, url, fsync)
            return await asyncio.to_thread(Store.open, url, fsync=fsync)
        except sa.exc.OperationalError as exc:
            why = reason(exc)
            if not retryable(url, exc):
                raise DatabaseUnreachable(
                    f"cannot connect to the database at {shown}: {why}"
                ) from None
            left = deadline - clock()
            if left <= 0:
                raise DatabaseUnreachable(
                    f"gave up waiting for the database at {shown} after {attempt}"
                    f" attempt{'s' if attempt > 1 else ''} in {wait:g} s (--db-wait): {why}"
                ) from None
        pause = min(delay, left)
        log.warning(
            "waiting for the database at %s (attempt %d): %s; retrying in %s s",
            shown,
            attempt,
            why,
            f"{pause:.1f}".removesuffix(".0"),
        )
        await sleep(pause)
        delay = min(delay * 2, MAX_DELAY)
