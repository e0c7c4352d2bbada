"""The `provisionerd.ProvisionerDaemon` service.

Registered from the start so that daemons get a precise UNIMPLEMENTED for each
RPC until the provisioner engine lands on the shared job engine.
"""

from __future__ import annotations

from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.server.unimplemented import fill_unimplemented

DESCRIPTOR = pd.DESCRIPTOR.services_by_name["ProvisionerDaemon"]
SERVICE = DESCRIPTOR.full_name


class ProvisionerDaemonService:
    def __init__(self) -> None:
        fill_unimplemented(self, DESCRIPTOR)
