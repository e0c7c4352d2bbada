"""Answer UNIMPLEMENTED, with a message, for every RPC not built yet.

The generated servicer base classes would raise NotImplementedError from a
synchronous method, which grpc.aio reports as UNKNOWN. Instead each method the
servicer does not define gets an async handler that aborts with
UNIMPLEMENTED, so clients see exactly which RPC is missing.
"""

from __future__ import annotations

from typing import Any

import grpc
from grpc import aio

import waystation


def fill_unimplemented(servicer: object, base: type, service: str) -> None:
    for name, attr in vars(base).items():
        if name.startswith("__") or not callable(attr):
            continue
        if getattr(type(servicer), name) is attr:
            setattr(servicer, name, _handler(f"/{service}/{name}"))


def _handler(method: str) -> Any:
    message = f"{method} is not implemented by waystation {waystation.__version__}"

    async def unimplemented(_request: Any, context: aio.ServicerContext[Any, Any]) -> None:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, message)

    return unimplemented
