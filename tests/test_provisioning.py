"""Provisioning end to end: templates, workspaces, builds and quotas through a
real daemon (the echo provisioner) over gRPC on loopback, on both backends."""

from __future__ import annotations

from collections.abc import AsyncIterator

import grpc
import pytest
import sqlalchemy as sa
from grpc import aio

from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.protocol.waystation.v1 import provisioning_pb2_grpc as pv_grpc
from waystation.server.app import RunningServer
from waystation.store import workspaces as workspace_tx
from waystation.testing import (
    echo_template,
    expect_status,
    push_request,
    running_daemon,
    wait_provisioner_job,
)

Job = pv.ProvisionerJob


@pytest.fixture
def prov(channel: aio.Channel) -> pv_grpc.ProvisioningAsyncStub:
    return pv_grpc.ProvisioningStub(channel)


@pytest.fixture
async def daemon(server: RunningServer, token: str) -> AsyncIterator[object]:
    async with running_daemon(server.address, token, heartbeat=0.5) as d:
        yield d


def vm(cost: int = 0, name: str = "dev") -> sdk.Resource:
    return sdk.Resource(name=name, type="echo_vm", daily_cost=cost)


async def push(prov: pv_grpc.ProvisioningAsyncStub, **kwargs: object) -> pv.TemplateVersion:
    pushed = await prov.PushTemplate(push_request(**kwargs))  # type: ignore[arg-type]
    job = await wait_provisioner_job(prov, pushed.version.job_id)
    assert job.status == Job.SUCCEEDED, job.error
    return await prov.GetTemplateVersion(pv.GetTemplateVersionRequest(version=pushed.version.id))


async def test_import_start_stop_delete_carries_state(
    prov: pv_grpc.ProvisioningAsyncStub, daemon: object
) -> None:
    parameter = sdk.RichParameter(name="size", type="string", default_value="small")
    archive = echo_template(resources=[vm(0)], parameters=[parameter], state=b"echo-state")
    version = await push(prov, name="base", archive=archive)
    assert [r.name for r in version.start_resources] == ["dev"]
    assert [p.name for p in version.rich_parameters] == ["size"]
    templates = (await prov.ListTemplates(pv.ListTemplatesRequest())).templates
    assert templates[0].active_version_id == version.id

    created = await prov.CreateWorkspace(
        pv.CreateWorkspaceRequest(name="ws", owner="alice", template="base")
    )
    job = await wait_provisioner_job(prov, created.build.job_id)
    assert job.status == Job.SUCCEEDED, job.error
    ref = pv.WorkspaceRef(owner="alice", name="ws")
    for transition in (sdk.STOP, sdk.DESTROY):
        built = await prov.BuildWorkspace(
            pv.BuildWorkspaceRequest(workspace=ref, transition=transition)
        )
        job = await wait_provisioner_job(prov, built.build.job_id)
        assert job.status == Job.SUCCEEDED, job.error
    shown = await prov.GetWorkspace(
        pv.GetWorkspaceRequest(workspace=pv.WorkspaceRef(id=created.workspace.id))
    )
    assert shown.workspace.deleted
    assert [b.build_number for b in shown.builds] == [3, 2, 1]
    assert all(b.state_size == len(b"echo-state") for b in shown.builds)
    assert shown.builds[-1].rich_parameter_values[0].value == "small"
    listed = await prov.ListWorkspaces(pv.ListWorkspacesRequest(owner="alice"))
    assert list(listed.workspaces) == []


async def test_watch_streams_logs_then_final_state(
    prov: pv_grpc.ProvisioningAsyncStub, daemon: object
) -> None:
    pushed = await prov.PushTemplate(push_request(archive=echo_template(logs=("one", "two"))))
    outputs, stages, statuses = [], [], []
    async for event in prov.WatchProvisionerJob(
        pv.WatchProvisionerJobRequest(id=pushed.version.job_id)
    ):
        if event.HasField("job"):
            statuses.append(event.job.status)
        for line in event.logs.logs:
            stages.append(line.stage)
            if line.output:
                outputs.append(line.output)
    assert statuses[-1] == Job.SUCCEEDED
    assert outputs.count("one") == 2  # the START and STOP plans of the import
    assert "Parsing template parameters" in stages
    assert "Detecting persistent resources" in stages


async def test_quota_denied_then_allowed_when_cost_does_not_go_up(
    prov: pv_grpc.ProvisioningAsyncStub, daemon: object
) -> None:
    await push(prov, name="cheap", archive=echo_template(resources=[vm(5)]))
    await push(prov, name="pricey", archive=echo_template(resources=[vm(8)]))
    await prov.SetQuota(pv.SetQuotaRequest(user="bob", allowance=10))
    first = await prov.CreateWorkspace(
        pv.CreateWorkspaceRequest(name="a", owner="bob", template="cheap")
    )
    assert (await wait_provisioner_job(prov, first.build.job_id)).status == Job.SUCCEEDED
    quota = await prov.GetQuota(pv.GetQuotaRequest(user="bob"))
    assert (quota.consumed, quota.allowance, quota.configured) == (5, 10, True)
    denied = await prov.CreateWorkspace(
        pv.CreateWorkspaceRequest(name="b", owner="bob", template="pricey")
    )
    job = await wait_provisioner_job(prov, denied.build.job_id)
    assert job.status == Job.FAILED
    assert "insufficient quota" in job.error
    # Lower the allowance below what is used: a rebuild at the same cost still passes.
    await prov.SetQuota(pv.SetQuotaRequest(user="bob", allowance=1))
    again = await prov.BuildWorkspace(
        pv.BuildWorkspaceRequest(
            workspace=pv.WorkspaceRef(owner="bob", name="a"), transition=sdk.START
        )
    )
    assert (await wait_provisioner_job(prov, again.build.job_id)).status == Job.SUCCEEDED


async def test_no_quota_means_no_limit(prov: pv_grpc.ProvisioningAsyncStub, daemon: object) -> None:
    await push(prov, name="t", archive=echo_template(resources=[vm(1000)]))
    created = await prov.CreateWorkspace(
        pv.CreateWorkspaceRequest(name="big", owner="carol", template="t")
    )
    assert (await wait_provisioner_job(prov, created.build.job_id)).status == Job.SUCCEEDED
    quota = await prov.GetQuota(pv.GetQuotaRequest(user="carol"))
    assert (quota.configured, quota.allowance, quota.consumed) == (False, -1, 1000)


async def test_cancel_pending_and_running(
    server: RunningServer, token: str, prov: pv_grpc.ProvisioningAsyncStub
) -> None:
    pushed = await prov.PushTemplate(push_request())
    cancelled = await prov.CancelProvisionerJob(
        pv.CancelProvisionerJobRequest(id=pushed.version.job_id)
    )
    assert cancelled.status == Job.CANCELED
    async with running_daemon(server.address, token, heartbeat=0.2):
        await push(prov, name="held", archive=echo_template(hold_apply=True))
        created = await prov.CreateWorkspace(
            pv.CreateWorkspaceRequest(name="w", owner="dan", template="held")
        )
        job_id = created.build.job_id
        await wait_provisioner_job(prov, job_id, Job.RUNNING)
        canceling = await prov.CancelProvisionerJob(pv.CancelProvisionerJobRequest(id=job_id))
        assert canceling.status in (Job.CANCELING, Job.CANCELED)
        job = await wait_provisioner_job(prov, job_id)
        assert job.status == Job.CANCELED
        assert "canceled" in job.error


async def test_bad_archives_are_refused(prov: pv_grpc.ProvisioningAsyncStub) -> None:
    await expect_status(
        prov.PushTemplate(push_request(archive=b"not a tar at all" * 100)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "not a tar file",
    )
    await expect_status(
        prov.PushTemplate(push_request(archive=b"\0" * (1 << 20 + 1))),
        grpc.StatusCode.INVALID_ARGUMENT,
        "limit is 1048576",
    )
    from waystation.provisioner import echo

    evil = echo.tar(extra={"../escape.txt": b"x"})
    await expect_status(
        prov.PushTemplate(push_request(archive=evil)),
        grpc.StatusCode.INVALID_ARGUMENT,
        "leaves the archive's root",
    )
    assert list((await prov.ListTemplates(pv.ListTemplatesRequest())).templates) == []


async def test_listing_workspaces_takes_the_same_queries_for_two_or_twenty(
    server: RunningServer, prov: pv_grpc.ProvisioningAsyncStub, daemon: object
) -> None:
    """A listing reads templates, latest builds and their jobs in one query each,
    not one per workspace (it used to run four per workspace, on the event loop)."""
    await push(prov, name="base", archive=echo_template(resources=[vm(0)]))
    queries: list[int] = []
    for total in (2, 20):
        owner = f"owner-{total}"
        builds = {}
        for i in range(total):
            created = await prov.CreateWorkspace(
                pv.CreateWorkspaceRequest(name=f"ws-{i}", owner=owner, template="base")
            )
            builds[created.workspace.id] = created.build.job_id
        listed = await prov.ListWorkspaces(pv.ListWorkspacesRequest(owner=owner))
        assert len(listed.workspaces) == total
        for workspace in listed.workspaces:
            assert workspace.template_name == "base"
            assert workspace.latest_build.build_number == 1
            assert workspace.latest_build.job.id == builds[workspace.id]
        statements: list[str] = []

        def count(*args: object, seen: list[str] = statements) -> None:
            seen.append(str(args[2]))

        with server.store._db._read_engine.connect() as conn:
            sa.event.listen(conn, "before_cursor_execute", count)
            again = workspace_tx.workspace_list(conn, owner, False)
        assert [w.id for w in again] == [w.id for w in listed.workspaces]
        queries.append(len(statements))
    assert queries[0] == queries[1], queries
