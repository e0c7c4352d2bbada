"""Factories and assertions for tests, ours and third parties' (plugins).

Factories always build valid records; pass only what a test is about.
"""

from __future__ import annotations

import itertools
from collections.abc import Awaitable
from typing import Any

import grpc
from grpc import aio

from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs

_seq = itertools.count(1)


def basis(name: str | None = None, path: str | None = None, **fields: Any) -> vs.Basis:
    n = next(_seq)
    return vs.Basis(name=name or f"basis-{n}", path=path or f"/srv/basis-{n}", **fields)


def project(
    basis_ref: sdk.Ref.Basis, name: str | None = None, path: str | None = None, **fields: Any
) -> vs.Project:
    n = next(_seq)
    return vs.Project(
        name=name or f"project-{n}", path=path or f"/srv/project-{n}", basis=basis_ref, **fields
    )


def target(name: str | None = None, **fields: Any) -> vs.Target:
    return vs.Target(name=name or f"target-{next(_seq)}", **fields)


def box(
    name: str = "hashicorp/bionic64",
    version: str = "1.0.0",
    provider: str = "virtualbox",
    **fields: Any,
) -> vs.Box:
    return vs.Box(
        name=name,
        version=version,
        provider=provider,
        directory=fields.pop("directory", f"/boxes/{name}/{version}/{provider}"),
        **fields,
    )


def basis_ref(b: vs.Basis) -> sdk.Ref.Basis:
    return sdk.Ref.Basis(resource_id=b.resource_id, name=b.name, path=b.path)


def project_ref(p: vs.Project) -> sdk.Ref.Project:
    return sdk.Ref.Project(resource_id=p.resource_id, name=p.name, path=p.path, basis=p.basis)


async def rpc_error(call: Awaitable[Any]) -> aio.AioRpcError:
    """Await an RPC that must fail and return its error."""
    try:
        await call
    except aio.AioRpcError as exc:
        return exc
    raise AssertionError("the RPC succeeded but should have failed")


async def expect_status(
    call: Awaitable[Any], code: grpc.StatusCode, fragment: str = ""
) -> aio.AioRpcError:
    exc = await rpc_error(call)
    assert exc.code() == code, f"expected {code.name}, got {exc.code().name}: {exc.details()}"
    assert fragment in (exc.details() or ""), f"{fragment!r} not in {exc.details()!r}"
    return exc
