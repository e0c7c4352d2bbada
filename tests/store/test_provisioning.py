"""Conformance of the provisioning verbs (store/verbs/provisioning.py): templates,
workspaces and builds, quotas, daemons and provisioner jobs, driven as a daemon
would drive them, with restarts in between."""

from __future__ import annotations

from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.store import Store
from waystation.store.provisioner_queue import Daemon
from waystation.testing import push_request

from .conftest import LEASE, Reopen, now_us

Job = pv.ProvisionerJob
HANG = 60_000_000
DAEMON = Daemon("d1", ("echo",))


async def _acquire(store: Store, job_id: str) -> pd.AcquiredJob:
    job, failed = await store.provisioner_job_acquire(DAEMON, now_us(), HANG, LEASE)
    assert failed == []
    assert job is not None and job.job_id == job_id
    return job


async def _imported(store: Store, name: str = "tpl") -> pv.TemplateVersion:
    _, version, queued = await store.template_push(push_request(name), "hash", now_us())
    assert queued.provisioner == "echo"
    await _acquire(store, version.job_id)
    done = pd.CompletedJob(job_id=version.job_id, template_import=pd.CompletedJob.TemplateImport())
    await store.provisioner_job_complete(DAEMON.id, done, now_us())
    return version


async def test_a_template_push_and_its_import_survive_a_restart(
    store: Store, reopen: Reopen
) -> None:
    template, version, _ = await store.template_push(push_request("tpl"), "hash", now_us())
    assert template.name == "tpl"
    store = await reopen()
    assert await store.provisioner_jobs_queued_kinds() == [("echo", {})]
    await _acquire(store, version.job_id)
    log = pd.Log(source=pd.LogSource.PROVISIONER, level=sdk.INFO, output="parsing")
    update = pd.UpdateJobRequest(job_id=version.job_id, logs=[log])
    updated = await store.provisioner_job_update(DAEMON.id, update, now_us(), HANG)
    assert updated.logged and updated.error is None
    done = pd.CompletedJob(job_id=version.job_id, template_import=pd.CompletedJob.TemplateImport())
    await store.provisioner_job_complete(DAEMON.id, done, now_us())

    store = await reopen()
    assert [t.name for t in await store.template_list()] == ["tpl"]
    [listed] = await store.template_version_list("tpl")
    assert listed.id == version.id
    assert await store.template_version_resolve("tpl") == version.id
    got = await store.template_version_get(version.id)
    assert got.job.status == Job.SUCCEEDED
    assert (await store.provisioner_job_view(version.job_id, now_us())).status == Job.SUCCEEDED
    assert [j.id for j in await store.provisioner_job_list(False, 10, now_us())] == [version.job_id]
    assert await store.output_read(version.job_id) != []


async def test_workspace_builds_and_quota_survive_a_restart(store: Store, reopen: Reopen) -> None:
    await _imported(store)
    quota = await store.quota_set("alice", 10)
    assert quota.allowance == 10
    request = pv.CreateWorkspaceRequest(name="ws", owner="alice", template="tpl")
    workspace, build, _ = await store.workspace_create(request, now_us())
    await _acquire(store, build.job_id)
    commit = pd.CommitQuotaRequest(job_id=build.job_id, daily_cost=4)
    assert (await store.quota_commit(DAEMON.id, commit, now_us(), HANG)).ok
    applied = pd.CompletedJob.WorkspaceBuild(
        state=b"state-1", resources=[sdk.Resource(name="vm", type="echo_vm", daily_cost=4)]
    )
    done = pd.CompletedJob(job_id=build.job_id, workspace_build=applied)
    await store.provisioner_job_complete(DAEMON.id, done, now_us())

    store = await reopen()
    assert (await store.quota_get("alice")).consumed == 4
    ref = pv.WorkspaceRef(owner="alice", name="ws")
    stop = pv.BuildWorkspaceRequest(workspace=ref, transition=sdk.STOP)
    _, second, _ = await store.workspace_build(stop, now_us())
    await _acquire(store, second.job_id)
    failed = pd.FailedJob(job_id=second.job_id, error="it broke")
    await store.provisioner_job_fail(DAEMON.id, failed, now_us())

    store = await reopen()
    shown = await store.workspace_show(ref)
    assert shown.workspace.id == workspace.id
    assert [(b.build_number, b.job.status) for b in shown.builds] == [
        (2, Job.FAILED),
        (1, Job.SUCCEEDED),
    ]
    assert shown.builds[-1].state_size == len(b"state-1")
    [listed] = await store.workspace_list("alice", False)
    assert listed.name == "ws"


async def test_dry_runs_daemons_and_jobs_that_end_without_their_daemon(store: Store) -> None:
    await _imported(store)
    broken_id, _ = await store.template_dry_run(pv.DryRunRequest(version="tpl"), now_us())
    await _acquire(store, broken_id)
    assert await store.provisioner_job_broken(broken_id, DAEMON.id, now_us())
    assert (await store.provisioner_job_view(broken_id, now_us())).status == Job.FAILED

    hung_id, _ = await store.template_dry_run(pv.DryRunRequest(version="tpl"), now_us())
    await _acquire(store, hung_id)
    later = now_us() + HANG + 1
    fired = await store.jobs_fire_timers(later, HANG / 1e6)  # one transaction fails it too
    assert fired.hung == [hung_id]
    assert (await store.provisioner_job_view(hung_id, now_us())).status == Job.FAILED

    [daemon] = await store.daemons_list(now_us())
    assert daemon.id == DAEMON.id
    await store.daemons_renew([DAEMON.id], now_us(), LEASE)
    await store.daemon_left(DAEMON.id, now_us())
    [daemon] = await store.daemons_list(now_us())
    assert not daemon.online
