"""`waystation.v1.Admin`: our own RPCs beside the upstream services."""

from __future__ import annotations

from typing import Any

from grpc import aio

from waystation.errors import FailedPrecondition
from waystation.protocol.waystation.v1 import admin_pb2 as admin
from waystation.server.errors import rpc
from waystation.server.unimplemented import fill_unimplemented
from waystation.store import Store

DESCRIPTOR = admin.DESCRIPTOR.services_by_name["Admin"]
SERVICE = DESCRIPTOR.full_name
Ctx = aio.ServicerContext[Any, Any]


class AdminService:
    def __init__(self, store: Store) -> None:
        self.store = store
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
