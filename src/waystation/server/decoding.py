"""Requests that do not parse end with INVALID_ARGUMENT, not a traceback.

gRPC parses a request with the handler's deserializer before any of our code
runs; a DecodeError there (corrupt wire format, bad UTF-8 in a string field)
escapes to grpc.aio, which logs a traceback and answers UNKNOWN, or INTERNAL
on a stream. One fuzzing client wrote thousands of tracebacks a minute.

`DecodeSafely` registers services (ours, health, reflection) so that a body
that does not parse becomes an `Undecodable` value instead, and the handler's
wrapper answers INVALID_ARGUMENT naming the message type and the reason, logged
rate-limited (waystation.logs: one line per reason every few seconds, however
many clients). The guard runs before the wrapper: a call it refuses is refused
(UNAUTHENTICATED) whatever its body. On request streams the check is made on
each message read; a bad one ends the call with INVALID_ARGUMENT.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from grpc import aio

from waystation.logs import limited

log = logging.getLogger(__name__)

Ctx = aio.ServicerContext[Any, Any]


@dataclass(frozen=True, slots=True)
class Undecodable:
    """What a request body that does not parse deserializes to."""

    type_name: str
    reason: str

    @property
    def details(self) -> str:
        return f"request body is not a valid {self.type_name}: {self.reason}"


class DecodeSafely:
    """Registers a service on `server` with handlers that answer INVALID_ARGUMENT
    for requests that do not parse (see the module docstring)."""

    def __init__(self, server: Any) -> None:
        self.server = server

    def add_generic_rpc_handlers(
        self, handlers: Iterable[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self.server.add_generic_rpc_handlers(tuple(_GenericDecodeSafely(h) for h in handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        safe = {method: decode_safely(f"/{service}/{method}", h) for method, h in handlers.items()}
        self.server.add_registered_method_handlers(service, safe)


class _GenericDecodeSafely(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    # gRPC looks registered handlers up first, so this per-call wrapping is hardly
    # ever reached; it is here for servers that register only generic handlers.
    def __init__(self, inner: grpc.GenericRpcHandler[Any, Any]) -> None:
        self.inner = inner

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self.inner.service(details)
        return decode_safely(details.method, handler) if handler is not None else None


def decode_safely(method: str, handler: Any) -> Any:
    """`handler` (a grpc RpcMethodHandler) with a deserializer that never raises
    and a behavior that refuses what did not parse."""
    parse = handler.request_deserializer
    kind = (handler.request_streaming, handler.response_streaming)
    field = {
        (False, False): "unary_unary",
        (False, True): "unary_stream",
        (True, False): "stream_unary",
        (True, True): "stream_stream",
    }[kind]
    behavior = getattr(handler, field)
    if parse is None:
        return handler  # raw bytes
    if _is_async(behavior):
        wrap = _request_stream if handler.request_streaming else _request
    elif not handler.request_streaming:
        # A sync handler runs on gRPC's thread pool (grpc_health's List is one).
        wrap = _sync_stream if handler.response_streaming else _sync_request
    else:
        return handler  # a sync request stream: none is served
    message_class = getattr(parse, "__self__", None)
    descriptor = getattr(message_class, "DESCRIPTOR", None)
    type_name = getattr(descriptor, "full_name", "") or f"request of {method}"
    return handler._replace(
        request_deserializer=_lenient(parse, type_name), **{field: wrap(method, behavior)}
    )


def _is_async(behavior: Any) -> bool:
    return inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)


def _lenient(parse: Callable[[bytes], Any], type_name: str) -> Callable[[bytes], Any]:
    def deserialize(raw: bytes) -> Any:
        try:
            return parse(raw)
        except DecodeError as exc:
            # upb: "Error parsing message with type 'T': Wire format was corrupt"
            reason = str(exc).rpartition("': ")[2] or "it does not parse"
        except Exception as exc:  # any parser failure is the client's body, not our bug
            reason = f"{type(exc).__name__}: {exc}"
        return Undecodable(type_name, reason[:1].lower() + reason[1:])

    return deserialize


async def reject(context: Ctx, method: str, request: Undecodable) -> None:
    """End the call with INVALID_ARGUMENT (raises AbortError), logged rate-limited."""
    _log(context, method, request)
    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)


def _log(context: Any, method: str, request: Undecodable) -> None:
    peer = context.peer()
    limited.log(
        log,
        logging.WARNING,
        ("undecodable request", request.reason),
        "undecodable request to %s from %s: %s",
        method,
        peer,
        request.details,
        method=method,
        peer=peer,
        code=grpc.StatusCode.INVALID_ARGUMENT.name,
    )


def _sync_request(method: str, behavior: Any) -> Any:
    def checked(request: Any, context: grpc.ServicerContext) -> Any:
        if type(request) is Undecodable:
            _log(context, method, request)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
        return behavior(request, context)

    return checked


def _sync_stream(method: str, behavior: Any) -> Any:
    def checked(request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
        if type(request) is Undecodable:
            _log(context, method, request)
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.details)
        yield from behavior(request, context)

    return checked


def _writing(behavior: Any) -> Any:
    """`behavior` as a coroutine: an async generator's responses are written
    here as gRPC itself would, with no extra generator between the handler and
    the wire (job output fans out through this)."""
    if not inspect.isasyncgenfunction(behavior):
        return behavior

    async def write_all(request: Any, context: Ctx) -> None:
        async for response in behavior(request, context):
            await context.write(response)

    return write_all


def _request(method: str, behavior: Any) -> Any:
    run = _writing(behavior)

    async def checked(request: Any, context: Ctx) -> Any:
        if type(request) is Undecodable:
            await reject(context, method, request)
        return await run(request, context)

    return checked


def _request_stream(method: str, behavior: Any) -> Any:
    run = _writing(behavior)

    async def checked(requests: AsyncIterator[Any], context: Ctx) -> Any:
        reader = _CheckedRequests(requests, context, method)
        try:
            return await run(reader, context)
        except asyncio.CancelledError:
            if reader.aborted is None:
                raise
            # Our own cancel (see _CheckedRequests): the call ended with the abort.
            raise reader.aborted from None

    return checked


class _CheckedRequests:
    """The handler's request stream; a message that did not parse ends the call.

    Read by the handler itself, that raises the abort, as context.abort does. A
    handler may read in a task of its own (to watch for the client leaving, or
    for CancelAcquire): that task ends cancelled and so does the handler, as if
    the client had left, so that no handler waits on for a stream that is over."""

    def __init__(self, requests: AsyncIterator[Any], context: Ctx, method: str) -> None:
        self.requests = requests
        self.context = context
        self.method = method
        self.handler_task = asyncio.current_task()
        self.aborted: aio.AbortError | None = None

    def __aiter__(self) -> _CheckedRequests:
        return self

    async def __anext__(self) -> Any:
        message = await self.requests.__anext__()
        if type(message) is not Undecodable:
            return message
        try:
            await reject(self.context, self.method, message)
        except aio.AbortError as exc:
            self.aborted = exc
        if self.aborted is None:  # unreachable: abort always raises
            raise asyncio.CancelledError
        if asyncio.current_task() is self.handler_task or self.handler_task is None:
            raise self.aborted
        self.handler_task.cancel()
        raise asyncio.CancelledError
