"""What a provisioner is: parse, plan and apply over one unpacked template.

A provisioner turns a template's source into infrastructure. The daemon hands
it a Session (the unpacked source, the previous build's state, a log sink and
a cancel flag) and calls `parse` (template import), `plan` and `apply`
(workspace builds; imports and dry runs plan only). Each answers with the
upstream Complete message; a non-empty `error` in it fails the job.

Cancel: `session.canceled` is set when someone cancels the job; a
provisioner should stop what it runs gracefully and answer with an error.
After a grace period the daemon cancels its task outright.

Third-party provisioners register a factory (a zero-argument callable that
returns a Provisioner) under the entry-point group `waystation.provisioners`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import Protocol

from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk

ENTRY_POINT_GROUP = "waystation.provisioners"

LogSink = Callable[["sdk.LogLevel.ValueType", str], None]


@dataclass
class Session:
    directory: Path  # the template's source, unpacked; the provisioner may write here
    state: bytes  # the previous build's state (empty for a first build or an import)
    log: LogSink  # a line of the provisioner's output, at a level
    canceled: asyncio.Event = field(default_factory=asyncio.Event)


class Provisioner(Protocol):
    name: str

    async def parse(self, session: Session) -> sdk.ParseComplete: ...

    async def plan(self, session: Session, request: sdk.PlanRequest) -> sdk.PlanComplete: ...

    async def apply(self, session: Session, request: sdk.ApplyRequest) -> sdk.ApplyComplete: ...


def builtin() -> dict[str, Callable[[], Provisioner]]:
    from waystation.provisioner.echo import EchoProvisioner
    from waystation.provisioner.terraform import TerraformProvisioner

    return {"echo": EchoProvisioner, "terraform": TerraformProvisioner}


def load(names: list[str]) -> dict[str, Provisioner]:
    """The provisioners named, built-in or from entry points; unknown names raise KeyError."""
    factories: dict[str, Callable[[], Provisioner]] = dict(builtin())
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        factories.setdefault(ep.name, ep.load())
    missing = [n for n in names if n not in factories]
    if missing:
        known = ", ".join(sorted(factories))
        raise KeyError(f"unknown provisioner {', '.join(missing)} (known: {known})")
    return {n: factories[n]() for n in names}
