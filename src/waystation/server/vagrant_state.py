"""Vagrant RPCs for bases, projects, targets and boxes.

Each handler: check the request's envelope, one store call, wrap the answer.
Field rules live in the store (waystation.store.resources, .boxes).
"""

from __future__ import annotations

from typing import Any

from google.protobuf.empty_pb2 import Empty
from grpc import aio

from waystation.errors import FailedPrecondition
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.server.errors import rpc
from waystation.store import Store

Ctx = aio.ServicerContext[Any, Any]


def _need(request: Any, field: str) -> None:
    if not request.HasField(field):
        raise FailedPrecondition(f"{field} is required")


class StateRPCs:
    store: Store

    # -- basis -------------------------------------------------------------

    @rpc
    async def UpsertBasis(
        self, request: vs.UpsertBasisRequest, context: Ctx
    ) -> vs.UpsertBasisResponse:
        _need(request, "basis")
        return vs.UpsertBasisResponse(basis=await self.store.basis_upsert(request.basis))

    @rpc
    async def GetBasis(self, request: vs.GetBasisRequest, context: Ctx) -> vs.GetBasisResponse:
        _need(request, "basis")
        return vs.GetBasisResponse(basis=await self.store.basis_get(request.basis))

    @rpc
    async def FindBasis(self, request: vs.FindBasisRequest, context: Ctx) -> vs.FindBasisResponse:
        _need(request, "basis")
        return vs.FindBasisResponse(basis=await self.store.basis_find(request.basis))

    @rpc
    async def ListBasis(self, request: Empty, context: Ctx) -> vs.ListBasisResponse:
        return vs.ListBasisResponse(basis=await self.store.basis_list())

    # -- project -----------------------------------------------------------

    @rpc
    async def UpsertProject(
        self, request: vs.UpsertProjectRequest, context: Ctx
    ) -> vs.UpsertProjectResponse:
        _need(request, "project")
        return vs.UpsertProjectResponse(project=await self.store.project_upsert(request.project))

    @rpc
    async def GetProject(
        self, request: vs.GetProjectRequest, context: Ctx
    ) -> vs.GetProjectResponse:
        _need(request, "project")
        return vs.GetProjectResponse(project=await self.store.project_get(request.project))

    @rpc
    async def FindProject(
        self, request: vs.FindProjectRequest, context: Ctx
    ) -> vs.FindProjectResponse:
        _need(request, "project")
        return vs.FindProjectResponse(project=await self.store.project_find(request.project))

    @rpc
    async def ListProjects(self, request: Empty, context: Ctx) -> vs.ListProjectsResponse:
        return vs.ListProjectsResponse(projects=await self.store.project_list())

    # -- target ------------------------------------------------------------

    @rpc
    async def UpsertTarget(
        self, request: vs.UpsertTargetRequest, context: Ctx
    ) -> vs.UpsertTargetResponse:
        _need(request, "target")
        target = await self.store.target_upsert(request.project, request.target)
        return vs.UpsertTargetResponse(target=target)

    @rpc
    async def DeleteTarget(self, request: vs.DeleteTargetRequest, context: Ctx) -> Empty:
        _need(request, "target")
        await self.store.target_delete(request.project, request.target)
        return Empty()

    @rpc
    async def GetTarget(self, request: vs.GetTargetRequest, context: Ctx) -> vs.GetTargetResponse:
        _need(request, "target")
        target = await self.store.target_get(request.project, request.target)
        return vs.GetTargetResponse(target=target)

    @rpc
    async def FindTarget(
        self, request: vs.FindTargetRequest, context: Ctx
    ) -> vs.FindTargetResponse:
        _need(request, "target")
        return vs.FindTargetResponse(target=await self.store.target_find(request.target))

    @rpc
    async def ListTargets(self, request: Empty, context: Ctx) -> vs.ListTargetsResponse:
        return vs.ListTargetsResponse(targets=await self.store.target_list())

    # -- box ---------------------------------------------------------------

    @rpc
    async def UpsertBox(self, request: vs.UpsertBoxRequest, context: Ctx) -> vs.UpsertBoxResponse:
        _need(request, "box")
        return vs.UpsertBoxResponse(box=await self.store.box_upsert(request.box))

    @rpc
    async def DeleteBox(self, request: vs.DeleteBoxRequest, context: Ctx) -> Empty:
        _need(request, "box")
        await self.store.box_delete(request.box)
        return Empty()

    @rpc
    async def GetBox(self, request: vs.GetBoxRequest, context: Ctx) -> vs.GetBoxResponse:
        _need(request, "box")
        return vs.GetBoxResponse(box=await self.store.box_get(request.box))

    @rpc
    async def ListBoxes(self, request: Empty, context: Ctx) -> vs.ListBoxesResponse:
        return vs.ListBoxesResponse(boxes=await self.store.box_list())

    @rpc
    async def FindBox(self, request: vs.FindBoxRequest, context: Ctx) -> vs.FindBoxResponse:
        _need(request, "box")
        box = await self.store.box_find(request.box)
        # Upstream answers an empty response when nothing matches.
        return vs.FindBoxResponse(box=box) if box is not None else vs.FindBoxResponse()
