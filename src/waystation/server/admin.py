"""`waystation.v1.Admin`: our own RPCs beside the upstream services."""

from __future__ import annotations

from typing import Any

from grpc import aio

from waystation.auth.service import Authenticator
from waystation.engine.engine import JobEngine
from waystation.engine.rules import now_us
from waystation.errors import FailedPrecondition, InvalidArgument
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol.waystation.v1 import admin_pb2 as admin
from waystation.server.errors import rpc
from waystation.server.unimplemented import fill_unimplemented
from waystation.store import jobs as job_tx
from waystation.store import runners as runner_tx

DESCRIPTOR = admin.DESCRIPTOR.services_by_name["Admin"]
SERVICE = DESCRIPTOR.full_name
Ctx = aio.ServicerContext[Any, Any]


class AdminService:
    def __init__(self, engine: JobEngine, auth: Authenticator) -> None:
        self.engine = engine
        self.store = engine.store
        self.auth = auth
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
        if await self.engine.db.write(runner_tx.config_set, list(request.variables)):
            await self.engine.config_changed()
        return vs.ConfigSetResponse()

    @rpc
    async def ConfigGet(self, request: vs.ConfigGetRequest, context: Ctx) -> vs.ConfigGetResponse:
        variables = await self.engine.db.read(runner_tx.config_get, request)
        return vs.ConfigGetResponse(variables=variables)

    @rpc
    async def ListRunners(
        self, request: admin.ListRunnersRequest, context: Ctx
    ) -> admin.ListRunnersResponse:
        rows = await self.engine.db.read(runner_tx.runners_list, now_us())
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
        position, blocker = await self.engine.db.read(job_tx.job_queue_position, request.job_id)
        return admin.GetQueuePositionResponse(position=position, blocked_by=blocker)

    @rpc
    async def RevokeToken(
        self, request: admin.RevokeTokenRequest, context: Ctx
    ) -> admin.RevokeTokenResponse:
        token_id = request.token_id.lower()
        if len(token_id) != 32 or any(c not in "0123456789abcdef" for c in token_id):
            raise InvalidArgument("token_id must be 32 hex digits (waystation token inspect)")
        return admin.RevokeTokenResponse(revoked=await self.auth.revoke(token_id))
