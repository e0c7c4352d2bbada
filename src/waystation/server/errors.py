"""Errors cross the gRPC boundary here, and only here.

A WaystationError becomes its status code with its (client-safe) message.
Anything else is a bug or an outage: it is logged with its traceback and the
client gets INTERNAL with a message that reveals nothing of the server.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, NoReturn, TypeVar

import grpc
from google.protobuf.message import Message
from grpc import aio

from waystation import errors, validate
from waystation.logs import limited

log = logging.getLogger(__name__)

CODES: dict[type[errors.WaystationError], grpc.StatusCode] = {
    errors.NotFound: grpc.StatusCode.NOT_FOUND,
    errors.FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    errors.InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    errors.AlreadyExists: grpc.StatusCode.ALREADY_EXISTS,
    errors.PermissionDenied: grpc.StatusCode.PERMISSION_DENIED,
    errors.Unauthenticated: grpc.StatusCode.UNAUTHENTICATED,
    errors.Unavailable: grpc.StatusCode.UNAVAILABLE,
}


def externalize(exc: BaseException, method: str) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, errors.WaystationError):
        for kind in type(exc).__mro__:
            if kind in CODES:
                return CODES[kind], exc.message
        return grpc.StatusCode.UNKNOWN, exc.message
    log.error("internal error in %s", method, exc_info=exc)
    return grpc.StatusCode.INTERNAL, "internal server error (details are in the server log)"


async def abort(
    context: aio.ServicerContext[Any, Any], exc: BaseException, method: str
) -> NoReturn:
    code, message = externalize(exc, method)
    log_refused(context, method, code, message)
    await context.abort(code, message)


REFUSALS = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


def log_refused(
    context: aio.ServicerContext[Any, Any], method: str, code: grpc.StatusCode, message: str
) -> None:
    """A call refused for its credentials: one line with method and peer, rate-limited
    by cause (anyone can make these at will)."""
    if code not in REFUSALS:
        return
    peer = context.peer()
    limited.log(
        log,
        logging.WARNING,
        ("refused", code, message),
        "refused %s from %s: %s %s",
        method,
        peer,
        code.name,
        message,
        method=method,
        peer=peer,
        code=code.name,
    )


Handler = TypeVar("Handler", bound=Callable[..., Awaitable[Any]])


def rpc(handler: Handler) -> Handler:
    """Wrap a unary handler `(self, request, context)` so errors are externalized."""

    @functools.wraps(handler)
    async def wrapper(self: Any, request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
        try:
            if isinstance(request, Message):
                validate.no_nul(request)
            return await handler(self, request, context)
        except aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, exc, handler.__qualname__)

    return wrapper  # type: ignore[return-value]


StreamHandler = TypeVar("StreamHandler", bound=Callable[..., AsyncIterator[Any]])


def stream_rpc(handler: StreamHandler) -> StreamHandler:
    """Wrap a server-streaming handler (an async generator) likewise."""

    @functools.wraps(handler)
    async def wrapper(
        self: Any, request: Any, context: aio.ServicerContext[Any, Any]
    ) -> AsyncIterator[Any]:
        try:
            validate.no_nul(request)
            async for item in handler(self, request, context):
                yield item
        except aio.AbortError:
            raise
        except Exception as exc:
            await abort(context, exc, handler.__qualname__)

    return wrapper  # type: ignore[return-value]
