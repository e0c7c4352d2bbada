"""Workspace owners (issue #21): the owner is the caller's user, always; a member
acts on their own workspaces only, through every RPC that changes one."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import pytest
from grpc import aio
from test_auth import PERMISSION_DENIED
from test_policy import mint

from waystation.client import Connection
from waystation.core.roles import Role
from waystation.core.timeouts import now_us
from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.protocol.waystation.v1 import provisioning_pb2_grpc as pv_grpc
from waystation.server.app import RunningServer
from waystation.testing import echo_template, push_request, running_daemon, wait_provisioner_job

Job = pv.ProvisionerJob


async def refused(call: Awaitable[Any], fragment: str) -> None:
    with pytest.raises(aio.AioRpcError) as caught:
        await call
    assert caught.value.code() == PERMISSION_DENIED
    assert fragment in (caught.value.details() or "")


async def test_a_member_acts_on_their_own_workspaces_only(
    server: RunningServer, token: str
) -> None:
    for name in ("alice", "bob"):
        await server.store.user_create(name, Role.MEMBER, now_us())
    alice_token, bob_token = [await mint(server, token, n) for n in ("alice", "bob")]
    async with (
        Connection(server.address, token).aio_channel() as admin_ch,
        Connection(server.address, alice_token).aio_channel() as alice_ch,
        Connection(server.address, bob_token).aio_channel() as bob_ch,
        running_daemon(server.address, token, heartbeat=0.2),
    ):
        admin = pv_grpc.ProvisioningStub(admin_ch)
        alice = pv_grpc.ProvisioningStub(alice_ch)
        bob = pv_grpc.ProvisioningStub(bob_ch)
        pushed = await alice.PushTemplate(
            push_request(name="held", archive=echo_template(hold_apply=True))
        )
        job = await wait_provisioner_job(alice, pushed.version.job_id)
        assert job.status == Job.SUCCEEDED, job.error

        # No owner named: the caller's user. Naming another is for admins.
        created = await alice.CreateWorkspace(pv.CreateWorkspaceRequest(name="ws", template="held"))
        assert created.workspace.owner == "alice"
        await refused(
            bob.CreateWorkspace(
                pv.CreateWorkspaceRequest(name="ws2", owner="alice", template="held")
            ),
            "acting as another owner (alice) needs the admin role; your token's user bob",
        )
        by_name = pv.WorkspaceRef(owner="alice", name="ws")
        by_id = pv.WorkspaceRef(id=created.workspace.id)
        for ref in (by_name, by_id):
            for transition in (sdk.START, sdk.STOP, sdk.DESTROY):
                request = pv.BuildWorkspaceRequest(workspace=ref, transition=transition)
                await refused(bob.BuildWorkspace(request), "bob")
        cancel = pv.CancelProvisionerJobRequest(id=created.build.job_id)
        await refused(bob.CancelProvisionerJob(cancel), "belongs to alice")

        # Reading is anyone's; alice's build goes on untouched; alice cancels it.
        shown = await bob.GetWorkspace(pv.GetWorkspaceRequest(workspace=by_id))
        assert [b.build_number for b in shown.builds] == [1]
        job = await bob.GetProvisionerJob(pv.GetProvisionerJobRequest(id=cancel.id))
        assert job.status in (Job.PENDING, Job.RUNNING)
        await alice.CancelProvisionerJob(cancel)
        assert (await wait_provisioner_job(alice, cancel.id)).status == Job.CANCELED

        # An admin may act for anyone.
        built = await admin.BuildWorkspace(
            pv.BuildWorkspaceRequest(workspace=by_name, transition=sdk.STOP)
        )
        assert built.workspace.owner == "alice"
        assert (await bob.GetQuota(pv.GetQuotaRequest())).user == "bob"
