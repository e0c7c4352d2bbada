"""The `hashicorp.vagrant.Vagrant` service, assembled from its RPC groups."""

from __future__ import annotations

from typing import Any

from google.protobuf.empty_pb2 import Empty
from grpc import aio

import waystation
from waystation.auth.service import Authenticator
from waystation.engine.engine import JobEngine
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.server.unimplemented import fill_unimplemented
from waystation.server.vagrant_jobs import JobRPCs
from waystation.server.vagrant_runners import RunnerRPCs
from waystation.server.vagrant_state import StateRPCs
from waystation.server.vagrant_tokens import TokenRPCs

DESCRIPTOR = vs.DESCRIPTOR.services_by_name["Vagrant"]
SERVICE = DESCRIPTOR.full_name

# Protocol versions we speak (upstream: api and entrypoint both at 1).
API_VERSION = vs.VersionInfo.ProtocolVersion(current=1, minimum=1)
ENTRYPOINT_VERSION = vs.VersionInfo.ProtocolVersion(current=1, minimum=1)


class VagrantService(StateRPCs, JobRPCs, RunnerRPCs, TokenRPCs):
    def __init__(self, engine: JobEngine, auth: Authenticator, auth_enabled: bool = True) -> None:
        self.engine = engine
        self.store = engine.store
        self.auth = auth
        self.auth_enabled = auth_enabled
        fill_unimplemented(self, DESCRIPTOR)

    async def GetVersionInfo(
        self, request: Empty, context: aio.ServicerContext[Any, Any]
    ) -> vs.GetVersionInfoResponse:
        info = vs.VersionInfo(
            api=API_VERSION, entrypoint=ENTRYPOINT_VERSION, version=waystation.__version__
        )
        return vs.GetVersionInfoResponse(info=info)
