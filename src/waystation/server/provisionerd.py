"""The `provisionerd.ProvisionerDaemon` service.

Registered from the start so that daemons get a precise UNIMPLEMENTED for each
RPC until the provisioner engine lands on the shared job engine.
"""

from __future__ import annotations

from waystation.protocol.provisionerd.proto import provisionerd_pb2_grpc as pd_grpc
from waystation.server.unimplemented import fill_unimplemented

SERVICE = "provisionerd.ProvisionerDaemon"


class ProvisionerDaemonService(pd_grpc.ProvisionerDaemonServicer):
    def __init__(self) -> None:
        fill_unimplemented(self, pd_grpc.ProvisionerDaemonServicer, SERVICE)
