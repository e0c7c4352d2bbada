"""Vagrant RPCs for tokens: bootstrap, login, invite, convert."""

from __future__ import annotations

from typing import Any

from google.protobuf.empty_pb2 import Empty
from grpc import aio

from waystation.auth.service import Authenticator
from waystation.core.roles import BOOTSTRAP_USER, LEGACY_USER, Role, user_name_problem
from waystation.core.wire import INVITE_ROLE, TOKEN_LABEL, TOKEN_TTL, TOKEN_USER
from waystation.durations import DurationError, parse_go_duration
from waystation.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.server.errors import rpc
from waystation.server.principal import current_actor, current_principal

Ctx = aio.ServicerContext[Any, Any]


class TokenRPCs:
    auth: Authenticator

    @rpc
    async def BootstrapToken(self, request: Empty, context: Ctx) -> vs.NewTokenResponse:
        user = _token_user(context) or BOOTSTRAP_USER
        return vs.NewTokenResponse(token=await self.auth.bootstrap(user))

    @rpc
    async def GenerateLoginToken(self, request: Empty, context: Ctx) -> vs.NewTokenResponse:
        user = await self._for_whom(context)
        ttl = _ttl(context)
        caller = current_principal(context)
        if ttl == 0 and caller is not None and not caller.admin:
            raise PermissionDenied(
                f"only an admin may mint a token that never expires; your token's user "
                f"{caller.user} is a {caller.role.value}"
            )
        label = _metadata(context, TOKEN_LABEL)
        token = await self.auth.login(user, actor=current_actor(context), ttl=ttl, label=label)
        return vs.NewTokenResponse(token=token)

    async def _for_whom(self, context: Ctx) -> str:
        """The user a token is minted for: the caller, or (admins only) whoever
        they name; PermissionDenied for anyone else, NotFound for nobody."""
        caller = current_principal(context)
        named = _token_user(context)
        if caller is None:  # auth is off: tokens are for whoever asks
            return (await self.auth.store.user_get(named)).name if named else LEGACY_USER
        if not named or named.lower() == caller.user.lower():
            return caller.user
        if not caller.admin:
            raise PermissionDenied(
                f"only an admin may mint a token for another user; your token's user "
                f"{caller.user} is a {caller.role.value}"
            )
        return (await self.auth.store.user_get(named)).name

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
        # The invited user need not exist yet: converting the invite creates them.
        caller = current_principal(context)
        user = _token_user(context) or (caller.user if caller else LEGACY_USER)
        problem = user_name_problem(user)
        if problem:
            raise InvalidArgument(f"invalid user name {user!r}: {problem}")
        role = _invite_role(context)
        label = _metadata(context, TOKEN_LABEL)
        actor = current_actor(context)
        token = await self.auth.invite(
            duration, entrypoint, user=user, actor=actor, role=role, label=label
        )
        return vs.NewTokenResponse(token=token)

    @rpc
    async def ConvertInviteToken(
        self, request: vs.ConvertInviteTokenRequest, context: Ctx
    ) -> vs.NewTokenResponse:
        if not request.token:
            raise FailedPrecondition("token is required")
        return vs.NewTokenResponse(token=await self.auth.convert_invite(request.token))


def _metadata(context: Ctx, key: str) -> str:
    value = dict(context.invocation_metadata() or ()).get(key, "")
    return value.strip() if isinstance(value, str) else ""


def _token_user(context: Ctx) -> str:
    return _metadata(context, TOKEN_USER)


def _ttl(context: Ctx) -> float | None:
    """The TTL asked for, seconds (0: never expires); None: the server's default."""
    text = _metadata(context, TOKEN_TTL)
    if not text:
        return None
    try:
        if text.replace(".", "", 1).isdigit():  # seconds
            seconds = float(text)
        elif text.endswith("d") and text[:-1].isdigit():  # days, which Go lacks: 30d
            seconds = int(text[:-1]) * 86400.0
        else:
            seconds = parse_go_duration(text).total_seconds()
    except DurationError as exc:
        raise InvalidArgument(f"invalid {TOKEN_TTL} {text!r}: {exc}") from None
    if seconds < 0:
        raise InvalidArgument(f"invalid {TOKEN_TTL} {text!r}: it must not be negative")
    return seconds


def _invite_role(context: Ctx) -> Role:
    text = _metadata(context, INVITE_ROLE)
    try:
        return Role(text.lower()) if text else Role.MEMBER
    except ValueError:
        choices = ", ".join(r.value for r in Role)
        raise InvalidArgument(f"unknown role {text!r}: one of {choices}") from None
