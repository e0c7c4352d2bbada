"""Who makes the RPC in hand: set by the guard (server/auth.py), read by handlers
for owner checks and the audit log."""

from __future__ import annotations

import contextvars
import inspect
from collections.abc import AsyncIterator
from typing import Any

import grpc
from grpc import aio

from waystation.auth.policy import Principal
from waystation.core.roles import Actor

__all__ = ["Principal", "current_actor", "current_principal", "with_principal"]

# The caller of the RPC in hand, set by the guard in the RPC's own task; None
# when auth is off (then there is nobody to tell apart).
_PRINCIPAL: contextvars.ContextVar[Principal | None] = contextvars.ContextVar(
    "waystation_principal", default=None
)


def current_principal(context: aio.ServicerContext[Any, Any] | None = None) -> Principal | None:
    """Who makes the call in hand (with its peer address), None when auth is off."""
    principal = _PRINCIPAL.get()
    if principal is not None and context is not None and not principal.peer:
        principal = Principal(principal.user, principal.role, principal.token_id, context.peer())
    return principal


def current_actor(context: aio.ServicerContext[Any, Any]) -> Actor | None:
    """The caller as the audit log records them; None when auth is off (nobody to name)."""
    principal = current_principal(context)
    if principal is None:
        return None
    return Actor(principal.user, principal.token_id, principal.peer)


def with_principal(
    handler: grpc.RpcMethodHandler[Any, Any], principal: Principal
) -> grpc.RpcMethodHandler[Any, Any]:
    """`handler` with `principal` set for its behaviour to read (current_principal).

    The wrapper is a coroutine or an async generator as the behaviour is: gRPC
    runs anything else in a thread pool."""
    kind = (handler.request_streaming, handler.response_streaming)
    behaviour: Any = {
        (False, False): handler.unary_unary,
        (False, True): handler.unary_stream,
        (True, False): handler.stream_unary,
        (True, True): handler.stream_stream,
    }[kind]
    if inspect.isasyncgenfunction(behaviour):

        async def stream(
            request: Any, context: aio.ServicerContext[Any, Any]
        ) -> AsyncIterator[Any]:
            _PRINCIPAL.set(principal)
            async for item in behaviour(request, context):
                yield item

        wrapped: Any = stream
    elif inspect.iscoroutinefunction(behaviour):

        async def call(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            _PRINCIPAL.set(principal)
            return await behaviour(request, context)

        wrapped = call
    else:  # a synchronous behaviour: none of ours; left as it is
        return handler
    make = {
        (False, False): grpc.unary_unary_rpc_method_handler,
        (False, True): grpc.unary_stream_rpc_method_handler,
        (True, False): grpc.stream_unary_rpc_method_handler,
        (True, True): grpc.stream_stream_rpc_method_handler,
    }[kind]
    return make(
        wrapped,
        request_deserializer=handler.request_deserializer,
        response_serializer=handler.response_serializer,
    )
