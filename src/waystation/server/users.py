"""`waystation.v1.Users`: users and their roles (issue #21). The guard lets
only admins in, but to WhoAmI (auth/policy.py)."""

from __future__ import annotations

from typing import Any

from google.protobuf.empty_pb2 import Empty
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from waystation.core.roles import LEGACY_USER, Role
from waystation.core.timeouts import now_us
from waystation.errors import FailedPrecondition, InvalidArgument, PermissionDenied
from waystation.protocol.waystation.v1 import users_pb2 as pu
from waystation.server.errors import rpc
from waystation.server.principal import current_actor, current_principal
from waystation.server.unimplemented import fill_unimplemented
from waystation.store import Store
from waystation.store.tokens import TokenRow
from waystation.store.users import User

DESCRIPTOR = pu.DESCRIPTOR.services_by_name["Users"]
SERVICE = DESCRIPTOR.full_name
AUDIT_DESCRIPTOR = pu.DESCRIPTOR.services_by_name["Audit"]
AUDIT_SERVICE = AUDIT_DESCRIPTOR.full_name
MAX_AUDIT_LIST = 10_000
Ctx = aio.ServicerContext[Any, Any]


class UsersService:
    def __init__(self, store: Store) -> None:
        self.store = store
        fill_unimplemented(self, DESCRIPTOR)

    @rpc
    async def CreateUser(self, request: pu.CreateUserRequest, context: Ctx) -> pu.User:
        role, actor = _role(request.role), current_actor(context)
        return _message(await self.store.user_create(request.name, role, now_us(), actor))

    @rpc
    async def ListUsers(self, request: Empty, context: Ctx) -> pu.ListUsersResponse:
        return pu.ListUsersResponse(users=[_message(u) for u in await self.store.user_list()])

    @rpc
    async def GetUser(self, request: pu.UserRef, context: Ctx) -> pu.User:
        return _message(await self.store.user_get(request.name))

    @rpc
    async def SetUserRole(self, request: pu.SetUserRoleRequest, context: Ctx) -> pu.User:
        role, actor = _role(request.role), current_actor(context)
        return _message(await self.store.user_set_role(request.name, role, actor, now_us()))

    @rpc
    async def DisableUser(self, request: pu.UserRef, context: Ctx) -> pu.User:
        actor = current_actor(context)
        return _message(await self.store.user_disable(request.name, now_us(), actor))

    @rpc
    async def DeleteUser(self, request: pu.UserRef, context: Ctx) -> Empty:
        await self.store.user_delete(request.name, current_actor(context), now_us())
        return Empty()

    @rpc
    async def ListTokens(
        self, request: pu.ListTokensRequest, context: Ctx
    ) -> pu.ListTokensResponse:
        caller = current_principal(context)
        user = request.user
        if caller is not None and not caller.admin:
            if user and user.lower() != caller.user.lower():
                raise PermissionDenied(
                    f"only an admin may list another user's tokens; your token's user "
                    f"{caller.user} is a {caller.role.value}"
                )
            user = caller.user
        rows = await self.store.token_list(user)
        return pu.ListTokensResponse(tokens=[_token(r) for r in rows])

    @rpc
    async def WhoAmI(self, request: Empty, context: Ctx) -> pu.WhoAmIResponse:
        caller = current_principal(context)
        if caller is None:  # auth off: nobody to name; the legacy user stands for all
            user = pu.User(name=LEGACY_USER, role=Role.ADMIN.value)
            return pu.WhoAmIResponse(user=user)
        found = await self.store.user_get(caller.user)
        return pu.WhoAmIResponse(user=_message(found), token_id=caller.token_id)


class AuditService:
    def __init__(self, store: Store) -> None:
        self.store = store
        fill_unimplemented(self, AUDIT_DESCRIPTOR)

    @rpc
    async def ListAuditEvents(
        self, request: pu.ListAuditEventsRequest, context: Ctx
    ) -> pu.ListAuditEventsResponse:
        since = request.since.ToMicroseconds() if request.HasField("since") else 0
        limit = min(request.limit or 1000, MAX_AUDIT_LIST)
        found = await self.store.audit_list(request.user, request.action, since, limit)
        return pu.ListAuditEventsResponse(
            events=[
                pu.AuditEvent(
                    at=_timestamp(e.at),
                    user=e.user,
                    token_id=e.token_id,
                    action=e.action,
                    object=e.object,
                    outcome=e.outcome,
                    peer=e.peer,
                )
                for e in found
            ]
        )


def _role(text: str) -> Role:
    if not text:
        raise FailedPrecondition("role is required: " + ", ".join(r.value for r in Role))
    try:
        return Role(text.lower())
    except ValueError:
        choices = ", ".join(r.value for r in Role)
        raise InvalidArgument(f"unknown role {text!r}: one of {choices}") from None


def _timestamp(micros: int) -> Timestamp:
    seconds, rest = divmod(micros, 1_000_000)
    return Timestamp(seconds=seconds, nanos=rest * 1000)


def _token(row: TokenRow) -> pu.TokenInfo:
    info = pu.TokenInfo(
        id=row.token_id,
        user=row.user,
        kind=row.kind,
        label=row.label,
        created_at=_timestamp(row.created_at),
        role=row.role.value if row.role else "",
        revoked=row.revoked,
    )
    if row.expires_at is not None:
        info.expires_at.CopyFrom(_timestamp(row.expires_at))
    if row.last_used_at is not None:
        info.last_used_at.CopyFrom(_timestamp(row.last_used_at))
    return info


def _message(user: User) -> pu.User:
    message = pu.User(
        name=user.name,
        role=user.role.value,
        created_at=_timestamp(user.created_at),
        disabled=user.disabled,
    )
    if user.disabled_at is not None:
        message.disabled_at.CopyFrom(_timestamp(user.disabled_at))
    return message
