"""`waystation.v1.Admin`: our own RPCs beside the upstream services."""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

from google.protobuf.empty_pb2 import Empty
from grpc import aio

import waystation
from waystation.auth.service import Authenticator
from waystation.core.timeouts import now_us
from waystation.engine.engine import JobEngine
from waystation.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from waystation.files import private_dir
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol.waystation.v1 import admin_pb2 as admin
from waystation.server.errors import rpc, stream_rpc
from waystation.server.principal import current_actor, current_principal
from waystation.server.unimplemented import fill_unimplemented
from waystation.store import snapshot

DESCRIPTOR = admin.DESCRIPTOR.services_by_name["Admin"]
SERVICE = DESCRIPTOR.full_name
Ctx = aio.ServicerContext[Any, Any]
SNAPSHOT_CHUNK = 1024 * 1024
log = logging.getLogger(__name__)


class AdminService:
    def __init__(
        self,
        engine: JobEngine,
        auth: Authenticator,
        data_dir: Path,
        exit_server: Callable[[], None] = lambda: None,
    ) -> None:
        self.engine = engine
        self.store = engine.store
        self.auth = auth
        self.data_dir = data_dir
        self.exit_server = exit_server
        fill_unimplemented(self, DESCRIPTOR)

    @rpc
    async def DeleteBasis(
        self, request: admin.DeleteBasisRequest, context: Ctx
    ) -> admin.DeleteResponse:
        if not request.HasField("basis"):
            raise FailedPrecondition("basis is required")
        return admin.DeleteResponse(deleted=await self.store.basis_delete(request.basis))

    @rpc
    async def DeleteProject(
        self, request: admin.DeleteProjectRequest, context: Ctx
    ) -> admin.DeleteResponse:
        if not request.HasField("project"):
            raise FailedPrecondition("project is required")
        return admin.DeleteResponse(deleted=await self.store.project_delete(request.project))

    @rpc
    async def ConfigSet(self, request: vs.ConfigSetRequest, context: Ctx) -> vs.ConfigSetResponse:
        actor = current_actor(context)
        if await self.engine.store.config_set(list(request.variables), actor, now_us()):
            await self.engine.config_changed()
        return vs.ConfigSetResponse()

    @rpc
    async def ConfigGet(self, request: vs.ConfigGetRequest, context: Ctx) -> vs.ConfigGetResponse:
        variables = await self.engine.store.config_get(request)
        return vs.ConfigGetResponse(variables=variables)

    @rpc
    async def ListRunners(
        self, request: admin.ListRunnersRequest, context: Ctx
    ) -> admin.ListRunnersResponse:
        rows = await self.engine.store.runners_list(now_us())
        response = admin.ListRunnersResponse()
        for runner, online, last_seen in rows:
            info = response.runners.add(runner=runner, online=online)
            info.last_seen.FromMicroseconds(last_seen)
        return response

    @rpc
    async def GetQueuePosition(
        self, request: admin.GetQueuePositionRequest, context: Ctx
    ) -> admin.GetQueuePositionResponse:
        if not request.job_id:
            raise FailedPrecondition("job_id is required")
        position, blocker = await self.engine.store.job_queue_position(request.job_id)
        return admin.GetQueuePositionResponse(position=position, blocked_by=blocker)

    @rpc
    async def RevokeToken(
        self, request: admin.RevokeTokenRequest, context: Ctx
    ) -> admin.RevokeTokenResponse:
        token_id = request.token_id.lower()
        if len(token_id) != 32 or any(c not in "0123456789abcdef" for c in token_id):
            raise InvalidArgument("token_id must be 32 hex digits (waystation token inspect)")
        caller = current_principal(context)
        if caller is not None and not caller.admin and token_id != caller.token_id:
            row = await self.store.token_find(token_id)
            if row is None or row.user.lower() != caller.user.lower():
                raise PermissionDenied(
                    f"only an admin may revoke another user's token; your token's user "
                    f"{caller.user} is a {caller.role.value}"
                )
        revoked = await self.auth.revoke(token_id, current_actor(context))
        return admin.RevokeTokenResponse(revoked=revoked)

    @stream_rpc
    async def CreateSnapshot(
        self, request: Empty, context: Ctx
    ) -> AsyncIterator[vs.CreateSnapshotResponse]:
        version = vs.VersionInfo(version=waystation.__version__)
        with tempfile.TemporaryFile() as spool:  # the read transaction ends before we stream
            await self.engine.store.snapshot_write(spool, version)
            actor = current_actor(context)
            if actor is not None:  # the snapshot reads only: its record is a write of its own
                await self.store.audit_record(actor, "snapshot.take", "", now_us())
            spool.seek(0)
            yield vs.CreateSnapshotResponse(open=vs.CreateSnapshotResponse.Open())
            while chunk := spool.read(SNAPSHOT_CHUNK):
                yield vs.CreateSnapshotResponse(chunk=chunk)

    @rpc
    async def RestoreSnapshot(
        self, requests: AsyncIterator[vs.RestoreSnapshotRequest], context: Ctx
    ) -> Empty:
        """Verify the whole snapshot, then stage it (an atomic rename) for the next start."""
        first = await anext(aiter(requests), None)
        if first is None or first.WhichOneof("event") != "open":
            raise FailedPrecondition("first message must be an Open event")
        staged = snapshot.staged(self.data_dir)
        private_dir(self.data_dir)
        # mkstemp's file is 0600, and so is the staged file it is renamed to.
        fd, name = tempfile.mkstemp(prefix="restore-", suffix=".partial", dir=self.data_dir)
        partial = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                async for message in requests:
                    if message.WhichOneof("event") != "chunk":
                        raise FailedPrecondition("only chunks may follow the Open event")
                    out.write(message.chunk)
                out.flush()
                await asyncio.to_thread(os.fsync, out.fileno())
            await self.engine.store.snapshot_verify(partial)
            partial.replace(staged)
            await asyncio.to_thread(_sync_dir, self.data_dir)  # the rename, durable
        finally:
            partial.unlink(missing_ok=True)
        log.warning("snapshot staged at %s: it replaces the whole store at the next start", staged)
        actor = current_actor(context)
        if actor is not None:  # recorded now; the restore itself replaces this log too
            await self.store.audit_record(actor, "snapshot.restore", str(staged), now_us())
        if first.open.exit:
            log.warning("shutting down, as the restore asked (open.exit)")
            self.exit_server()
        return Empty()


def _sync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
