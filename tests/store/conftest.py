"""The store's conformance suite: every verb, on both backends, with no gRPC.

`store` is a `Store` opened directly on `backend_url` (SQLite and PostgreSQL);
`reopen()` closes it and opens a new one on the same URL, as a restart would
(Waypoint's statetest restart factory): what a verb wrote must be there after.
Test files mirror `waystation.store.verbs` one to one.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from waystation.core.timeouts import now_us
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store import Store

Reopen = Callable[[], Awaitable[Store]]

# Deadlines and leases of the suite, microseconds: long enough that nothing
# fires unless a test moves `now` past it.
ACK = 60_000_000
HEARTBEAT = 60_000_000
LEASE = 60_000_000


class Opened:
    """The store under test; reopening it replaces it."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.current: Store | None = None

    async def open(self) -> Store:
        self.current = await asyncio.to_thread(Store.open, self.url)
        return self.current

    async def reopen(self) -> Store:
        assert self.current is not None
        closing, self.current = self.current, None
        await closing.close()
        return await self.open()


@pytest.fixture
async def opened(backend_url: str) -> AsyncIterator[Opened]:
    opened = Opened(backend_url)
    await opened.open()
    try:
        yield opened
    finally:
        if opened.current is not None:
            await opened.current.close()


@pytest.fixture
def store(opened: Opened) -> Store:
    assert opened.current is not None
    return opened.current


@pytest.fixture
def reopen(opened: Opened) -> Reopen:
    return opened.reopen


def noop_job(runner_id: str | None = None) -> vs.Job:
    runner = (
        vs.Ref.Runner(id=vs.Ref.RunnerId(id=runner_id))
        if runner_id
        else vs.Ref.Runner(any=vs.Ref.RunnerAny())
    )
    return vs.Job(target_runner=runner, noop=vs.Job.Noop())


__all__ = ["ACK", "HEARTBEAT", "LEASE", "Reopen", "noop_job", "now_us"]
