"""Factories and assertions for tests, ours and third parties' (plugins).

Factories always build valid records; pass only what a test is about.
"""

from __future__ import annotations

import itertools
import re
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable
from pathlib import Path
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


class ServerProcess:
    """`waystation server run` as a child process, for restart and crash tests."""

    def __init__(self, data_dir: Path, db_url: str = "", *args: str) -> None:
        self.data_dir = data_dir
        self.db_url = db_url
        self.args = args
        self.log = data_dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self, timeout: float = 60) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "waystation.cli.main", "server", "run"]
        cmd += ["--listen", "127.0.0.1:0", "--data-dir", str(self.data_dir), *self.args]
        if self.db_url:
            cmd += ["--db", self.db_url]
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            found = re.search(r"listening on (\S+)", text)
            if found:
                self.address = found.group(1)
                return self.address
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise TimeoutError(f"server did not start within {timeout}s")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        self.stop(signal.SIGKILL)

    def output(self) -> str:
        return self.log.read_text(errors="replace")
