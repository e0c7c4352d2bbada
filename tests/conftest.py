"""Shared fixtures: a real server on loopback, on each storage backend.

`backend_url` is parametrized over SQLite and PostgreSQL; the PostgreSQL case
runs when WAYSTATION_TEST_POSTGRES_URL is set (CI sets it) and each test gets
a schema of its own there, dropped afterwards.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psycopg
import pytest
from google.protobuf.empty_pb2 import Empty
from grpc import aio

from waystation.client import Connection
from waystation.core.settings import ServerSettings, sqlite_url
from waystation.core.timeouts import Timeouts
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc
from waystation.server.app import RunningServer, start

POSTGRES_URL = os.environ.get("WAYSTATION_TEST_POSTGRES_URL", "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if "backend_url" in getattr(item, "fixturenames", ()):
            callspec = getattr(item, "callspec", None)
            if callspec is not None and callspec.params.get("backend_url") == "postgres":
                item.add_marker(pytest.mark.postgres)


@pytest.fixture(params=["sqlite", "postgres"])
def backend_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield sqlite_url(tmp_path / "waystation.db")
        return
    yield from _postgres()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A schema of its own on the test PostgreSQL, for a test that uses both backends."""
    yield from _postgres()


def _postgres() -> Iterator[str]:
    if not POSTGRES_URL:
        if os.environ.get("CI"):
            pytest.fail("CI must run the PostgreSQL tests: set WAYSTATION_TEST_POSTGRES_URL")
        pytest.skip("WAYSTATION_TEST_POSTGRES_URL is not set")
    with postgres_schema() as url:
        yield url


class postgres_schema:
    """A fresh schema on the test PostgreSQL, as a URL whose search_path is it."""

    def __init__(self) -> None:
        self.schema = f"t_{uuid.uuid4().hex[:12]}"

    def __enter__(self) -> str:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'CREATE SCHEMA "{self.schema}"')
        sep = "&" if "?" in POSTGRES_URL else "?"
        return f"{POSTGRES_URL}{sep}options=-csearch_path%3D{self.schema}"

    def __exit__(self, *exc: object) -> None:
        with psycopg.connect(POSTGRES_URL, autocommit=True) as conn:
            conn.execute(f'DROP SCHEMA "{self.schema}" CASCADE')


@pytest.fixture
def timeouts() -> Timeouts:
    """Engine timeouts for tests; a module overrides this fixture to shrink one."""
    return Timeouts(poll=0.25)


@pytest.fixture
def settings(backend_url: str, tmp_path: Path, timeouts: Timeouts) -> ServerSettings:
    return ServerSettings(
        listen="127.0.0.1:0",
        data_dir=tmp_path / "data",
        db_url=backend_url,
        shutdown_grace=1,
        timeouts=timeouts,
    )


@pytest.fixture
async def server(settings: ServerSettings) -> AsyncIterator[RunningServer]:
    running = await start(settings)
    yield running
    await running.stop(1)


@pytest.fixture
async def token(server: RunningServer) -> str:
    """The bootstrap login token of the fixture server (auth is on, as by default)."""
    async with aio.insecure_channel(server.address) as ch:
        response = await vs_grpc.VagrantStub(ch).BootstrapToken(Empty())
    return str(response.token)


@pytest.fixture
async def channel(server: RunningServer, token: str) -> AsyncIterator[aio.Channel]:
    """A channel that sends the login token with every call."""
    async with Connection(server.address, token).aio_channel() as ch:
        yield ch


@pytest.fixture
def vagrant(channel: aio.Channel) -> vs_grpc.VagrantAsyncStub:
    return vs_grpc.VagrantStub(channel)


@pytest.fixture
def admin(channel: aio.Channel) -> admin_grpc.AdminAsyncStub:
    return admin_grpc.AdminStub(channel)
