"""The `provisionerd.ProvisionerDaemon` service: a thin translation onto the job engine.

A daemon says who it is in gRPC metadata on every call (upstream Coder puts
the same facts in its connection's query string):

- `provisioner-daemon-id`: its id, required. Jobs are owned by this id, so a
  daemon that reconnects under the same id keeps reporting on its job.
- `provisioner-daemon-provisioner`: a provisioner type it serves (repeat the
  key, or separate with commas); at least one to acquire.
- `provisioner-daemon-tag`: `key=value`, repeated: it takes only jobs whose
  tags are all among these.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from waystation import validate
from waystation.auth.service import Authenticator, recheck
from waystation.core.wire import DAEMON_ID, DAEMON_PROVISIONER, DAEMON_TAG
from waystation.engine.engine import JobEngine
from waystation.errors import InvalidArgument
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.server.errors import rpc
from waystation.server.unimplemented import fill_unimplemented
from waystation.store.provisioner_queue import Daemon

DESCRIPTOR = pd.DESCRIPTOR.services_by_name["ProvisionerDaemon"]
SERVICE = DESCRIPTOR.full_name
Ctx = aio.ServicerContext[Any, Any]


def identity(context: Ctx, *, acquiring: bool = False) -> Daemon:
    """The calling daemon, from its metadata; INVALID_ARGUMENT when malformed."""
    daemon_id = ""
    provisioners: list[str] = []
    tags: dict[str, str] = {}
    for key, value in context.invocation_metadata() or ():
        if not isinstance(value, str):
            continue
        if key == DAEMON_ID:
            daemon_id = value
        elif key == DAEMON_PROVISIONER:
            provisioners.extend(p.strip() for p in value.split(",") if p.strip())
        elif key == DAEMON_TAG:
            name, sep, tag_value = value.partition("=")
            if not sep or not name:
                raise InvalidArgument(f"{DAEMON_TAG} must be key=value, got {value!r}")
            tags[name] = tag_value
    if not daemon_id:
        raise InvalidArgument(f"provisioner daemon id is required: send it as {DAEMON_ID} metadata")
    validate.resource_id("provisioner daemon", daemon_id, field="id")
    if acquiring and not provisioners:
        raise InvalidArgument(
            f"a daemon must serve at least one provisioner: send {DAEMON_PROVISIONER} metadata"
        )
    return Daemon(daemon_id, tuple(sorted(set(provisioners))), tags)


class ProvisionerDaemonService:
    def __init__(self, engine: JobEngine, auth: Authenticator, auth_enabled: bool = True) -> None:
        self.engine = engine
        self.auth = auth
        self.auth_enabled = auth_enabled
        fill_unimplemented(self, DESCRIPTOR)

    @rpc
    async def AcquireJob(self, request: pd.Empty, context: Ctx) -> pd.AcquiredJob:
        """Deprecated upstream: a long poll that answers an empty job when none comes."""
        daemon = identity(context, acquiring=True)
        timeout = self.engine.timeouts.acquire_long_poll
        again = recheck(self.auth, context, self.auth_enabled)
        job = await self.engine.acquire(daemon, asyncio.Event(), timeout, again)
        return job if job is not None else pd.AcquiredJob()

    @rpc
    async def AcquireJobWithCancel(
        self, requests: AsyncIterator[pd.CancelAcquire], context: Ctx
    ) -> None:
        """Exactly one AcquiredJob: a job, or an empty one when CancelAcquire won."""
        daemon = identity(context, acquiring=True)
        stop = asyncio.Event()

        async def read_cancel() -> None:
            async for _ in requests:
                break  # any message means CancelAcquire
            stop.set()  # a half-closed stream cancels too

        reader = asyncio.ensure_future(read_cancel())
        try:
            again = recheck(self.auth, context, self.auth_enabled)
            job = await self.engine.acquire(daemon, stop, recheck=again)
        finally:
            reader.cancel()
        if job is None:
            if stop.is_set():  # CancelAcquire: the daemon is going away
                await self.engine.daemon_left(daemon.id)
            await context.write(pd.AcquiredJob())
            return
        try:
            await context.write(job)
        except BaseException:
            # The job was locked but cannot reach the daemon: fail it (upstream).
            await asyncio.shield(self.engine.provisioner_broken(job.job_id, daemon.id))
            raise

    @rpc
    async def UpdateJob(self, request: pd.UpdateJobRequest, context: Ctx) -> pd.UpdateJobResponse:
        return await self.engine.provisioner_update(identity(context).id, request)

    @rpc
    async def CommitQuota(
        self, request: pd.CommitQuotaRequest, context: Ctx
    ) -> pd.CommitQuotaResponse:
        return await self.engine.commit_quota(identity(context).id, request)

    @rpc
    async def FailJob(self, request: pd.FailedJob, context: Ctx) -> pd.Empty:
        await self.engine.provisioner_fail(identity(context).id, request)
        return pd.Empty()

    @rpc
    async def CompleteJob(self, request: pd.CompletedJob, context: Ctx) -> pd.Empty:
        await self.engine.provisioner_complete(identity(context).id, request)
        return pd.Empty()
