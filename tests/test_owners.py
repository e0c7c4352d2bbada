"""Workspace owners (issue #21): the owner is the caller's user, always; a member
acts on their own workspaces only, through every RPC that changes one."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Any

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty
from grpc import aio
from test_auth import PERMISSION_DENIED, token_id
from test_policy import mint

from waystation.client import Connection
from waystation.core.roles import BOOTSTRAP_USER, Role
from waystation.core.timeouts import now_us
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.protocol.waystation.v1 import provisioning_pb2_grpc as pv_grpc
from waystation.protocol.waystation.v1 import users_pb2 as pu
from waystation.protocol.waystation.v1 import users_pb2_grpc as pu_grpc
from waystation.server.app import RunningServer
from waystation.testing import (
    echo_template,
    noop_job,
    push_request,
    running_daemon,
    wait_provisioner_job,
)

Job = pv.ProvisionerJob
ADMIN = BOOTSTRAP_USER  # the fixture's token is the bootstrap token


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

        # The audit log has each change, by whom; none of bob's refusals.
        audit = pu_grpc.AuditStub(admin_ch)
        listed = await audit.ListAuditEvents(pu.ListAuditEventsRequest())
        events = [e for e in listed.events if e.user in ("alice", "bob") or "workspace" in e.action]
        assert [(e.user, e.action) for e in reversed(events)] == [
            ("alice", "template.push"),
            ("alice", "workspace.create"),
            ("alice", "provisioner_job.cancel"),
            (ADMIN, "workspace.stop"),
        ]
        alice_id = token_id(alice_token)
        assert [e.token_id for e in events[1:]] == [alice_id] * 3
        assert events[0].token_id == token_id(token)
        assert {e.outcome for e in events} == {"ok"}
        assert all(e.peer.startswith("ipv") for e in events)
        assert events[3].object == f"held@{pushed.version.name} job {pushed.version.job_id}"
        assert events[2].object.startswith("alice/ws build 1 job ")
        assert events[1].object.startswith(f"{cancel.id} (")
        assert events[0].object.startswith("alice/ws build 2 job ")


async def test_vagrant_cancels_and_prunes_are_audited(server: RunningServer, token: str) -> None:
    await server.store.user_create("alice", Role.MEMBER, now_us())
    alice_token = await mint(server, token, "alice")
    async with (
        Connection(server.address, token).aio_channel() as admin_ch,
        Connection(server.address, alice_token).aio_channel() as alice_ch,
    ):
        alice = vs_grpc.VagrantStub(alice_ch)
        job_id = (await alice.QueueJob(vs.QueueJobRequest(job=noop_job()))).job_id
        await alice.CancelJob(vs.CancelJobRequest(job_id=job_id))
        await alice.CancelJob(vs.CancelJobRequest(job_id=job_id))  # finished: no change
        with pytest.raises(aio.AioRpcError) as unknown:
            await alice.CancelJob(vs.CancelJobRequest(job_id="nope"))
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        await refused(alice.PruneOldJobs(Empty()), "needs the admin role")
        await vs_grpc.VagrantStub(admin_ch).PruneOldJobs(Empty())

        audit = pu_grpc.AuditStub(admin_ch)
        listed = await audit.ListAuditEvents(pu.ListAuditEventsRequest(action="job.cancel"))
        assert [(e.user, e.object) for e in listed.events] == [("alice", f"{job_id} (ended)")]
        listed = await audit.ListAuditEvents(pu.ListAuditEventsRequest(action="jobs.prune"))
        assert [(e.user, e.token_id) for e in listed.events] == [(ADMIN, token_id(token))]
        assert listed.events[0].peer.startswith("ipv")
