"""Vagrant RPCs for tokens: bootstrap, login, invite, convert."""

from __future__ import annotations

from typing import Any

from google.protobuf.empty_pb2 import Empty
from grpc import aio

from waystation.auth.service import Authenticator
from waystation.durations import DurationError, parse_go_duration
from waystation.errors import FailedPrecondition, InvalidArgument
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.server.errors import rpc

Ctx = aio.ServicerContext[Any, Any]


class TokenRPCs:
    auth: Authenticator

    @rpc
    async def BootstrapToken(self, request: Empty, context: Ctx) -> vs.NewTokenResponse:
        return vs.NewTokenResponse(token=await self.auth.bootstrap())

    @rpc
    async def GenerateLoginToken(self, request: Empty, context: Ctx) -> vs.NewTokenResponse:
        return vs.NewTokenResponse(token=await self.auth.login())

    @rpc
    async def GenerateInviteToken(
        self, request: vs.InviteTokenRequest, context: Ctx
    ) -> vs.NewTokenResponse:
        if not request.duration:
            raise FailedPrecondition("duration is required, e.g. 24h")
        try:
            duration = parse_go_duration(request.duration)
        except DurationError as exc:
            raise InvalidArgument(f"invalid duration: {exc}") from None
        if duration.total_seconds() <= 0:
            raise InvalidArgument("invalid duration: it must be positive")
        entrypoint = request.entrypoint if request.HasField("entrypoint") else None
        return vs.NewTokenResponse(token=await self.auth.invite(duration, entrypoint))

    @rpc
    async def ConvertInviteToken(
        self, request: vs.ConvertInviteTokenRequest, context: Ctx
    ) -> vs.NewTokenResponse:
        if not request.token:
            raise FailedPrecondition("token is required")
        return vs.NewTokenResponse(token=await self.auth.convert_invite(request.token))
