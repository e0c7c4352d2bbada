"""The one guard in front of every service: tokens and protocol versions.

Every RPC needs a valid token in the `authorization` metadata except the
public ones (GetVersionInfo, BootstrapToken, ConvertInviteToken, health and
reflection). Entrypoint tokens reach only `Entrypoint*` methods; invite tokens
reach nothing but ConvertInviteToken. A login token names its user; that user's
row (read per call with the token's revocation) gives the role, and the policy
table (auth/policy.py) says whether the role may call the method, before the
handler runs; handlers read the caller with `current_principal`. Vagrant methods other than
GetVersionInfo may carry `client-api-protocol: "<min>,<current>"`, refused
when it cannot overlap the versions we speak.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio

from waystation.auth import policy, tokens
from waystation.auth.policy import Principal
from waystation.auth.service import Authenticator
from waystation.core.wire import API_PROTOCOL, AUTHORIZATION
from waystation.errors import Unauthenticated
from waystation.server.errors import log_refused
from waystation.server.principal import with_principal
from waystation.server.vagrant import API_VERSION

VAGRANT = "/hashicorp.vagrant.Vagrant/"
PUBLIC_METHODS = policy.PUBLIC
PUBLIC_PREFIXES = (
    "/grpc.health.v1.Health/",
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)


if TYPE_CHECKING:
    _Interceptor = aio.ServerInterceptor[Any, Any]
else:  # generic only to type checkers
    _Interceptor = aio.ServerInterceptor


class Guard(_Interceptor):
    def __init__(self, authenticator: Authenticator, *, enabled: bool = True) -> None:
        self.authenticator = authenticator
        self.enabled = enabled

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None:
            return handler
        method: str = details.method
        metadata = dict(details.invocation_metadata or ())
        header = metadata.get(API_PROTOCOL)
        problem = protocol_problem(method, header if isinstance(header, str) else None)
        if problem:
            return refuse(handler, grpc.StatusCode.INVALID_ARGUMENT, problem, method)
        if not self.enabled or method in PUBLIC_METHODS or method.startswith(PUBLIC_PREFIXES):
            return handler
        text = metadata.get(AUTHORIZATION, "")
        if isinstance(text, bytes) or not text:
            return refuse(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "Authorization token is not supplied",
                method,
            )
        try:
            token, user = await self.authenticator.authenticate(text.removeprefix("Bearer "))
        except Unauthenticated as exc:
            return refuse(handler, grpc.StatusCode.UNAUTHENTICATED, exc.message, method)
        name = method.rsplit("/", 1)[-1]
        if token.invite or user is None:
            return refuse(
                handler,
                grpc.StatusCode.UNAUTHENTICATED,
                "invalid authentication token: an invite token is not a login token",
                method,
            )
        if token.HasField("entrypoint") and not name.startswith("Entrypoint"):
            return refuse(
                handler,
                grpc.StatusCode.PERMISSION_DENIED,
                "entrypoint tokens may only call Entrypoint methods",
                method,
            )
        principal = Principal(user.name, user.role, tokens.token_id_hex(token))
        action = policy.action_of(method)
        # A method the table lacks is refused, not let through: tests/test_policy.py
        # keeps the table complete, this keeps a gap from being a hole.
        problem = (
            policy.refusal(action, principal)
            if action
            else "this call is in no policy: nobody may make it"
        )
        if problem:
            return refuse(handler, grpc.StatusCode.PERMISSION_DENIED, problem, method)
        return with_principal(handler, principal)


def protocol_problem(method: str, header: str | None) -> str:
    """Why the client's protocol range is unacceptable ("" if it is fine)."""
    if header is None or not method.startswith(VAGRANT) or method.endswith("/GetVersionInfo"):
        return ""
    parts = header.split(",")
    if len(parts) != 2 or not all(p.strip().isdigit() for p in parts):
        return f'invalid {API_PROTOCOL} header {header!r}: want "<minimum>,<current>"'
    minimum, current = (int(p) for p in parts)
    if minimum > current:
        return f"invalid {API_PROTOCOL} header {header!r}: minimum above current"
    if current < API_VERSION.minimum or minimum > API_VERSION.current:
        return (
            f"incompatible client protocol {minimum}..{current}; this server speaks "
            f"{API_VERSION.minimum}..{API_VERSION.current}"
        )
    return ""


def refuse(
    handler: grpc.RpcMethodHandler[Any, Any], code: grpc.StatusCode, message: str, method: str
) -> grpc.RpcMethodHandler[Any, Any]:
    """A handler of the same kind as `handler` that only aborts. It never looks
    at the request, which may not even parse (server.decoding)."""

    async def abort(_request: Any, context: aio.ServicerContext[Any, Any]) -> None:
        log_refused(context, method, code, message)
        await context.abort(code, message)

    kind = (handler.request_streaming, handler.response_streaming)
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(
        abort,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
