"""Answer UNIMPLEMENTED, with a message, for every RPC not built yet.

Servicers are plain classes; every method of the service (read from its
descriptor) that a servicer does not define gets an async handler that aborts
with UNIMPLEMENTED and names the method, so clients see exactly what is
missing instead of a generic error.
"""

from __future__ import annotations

from typing import Any

import grpc
from google.protobuf.descriptor import ServiceDescriptor
from grpc import aio

import waystation


def fill_unimplemented(servicer: object, service: ServiceDescriptor) -> None:
    for method in service.methods:
        if not hasattr(servicer, method.name):
            setattr(servicer, method.name, _handler(f"/{service.full_name}/{method.name}"))


def _handler(method: str) -> Any:
    message = f"{method} is not implemented by waystation {waystation.__version__}"

    async def unimplemented(_request: Any, context: aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return unimplemented
