"""Conformance of the audit log verbs (store/verbs/audit.py) and of the audited
verbs: the entry is written with the change, and not at all when it fails."""

from __future__ import annotations

import pytest

from waystation.core.roles import Actor, Role
from waystation.errors import AlreadyExists, FailedPrecondition, NotFound
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.store import Store
from waystation.store import provisioner_queue as pq
from waystation.store.provisioner_queue import Daemon
from waystation.testing import push_request

from .conftest import LEASE, Reopen, noop_job, now_us

ROOT = Actor("root", "ab" * 16, "ipv4:127.0.0.1:5000")
DAEMON = Daemon("d1", ("echo",))
HANG = 60_000_000


async def test_audited_changes_are_recorded_with_them(store: Store, reopen: Reopen) -> None:
    await store.user_create("root", Role.ADMIN, now_us())  # no actor: nothing recorded
    await store.user_create("alice", Role.MEMBER, 10, ROOT)
    await store.user_set_role("alice", Role.RUNNER, ROOT, 11)
    await store.user_disable("alice", 12, ROOT)
    await store.token_revoke("cd" * 16, 13, ROOT)
    await store.user_delete("alice", ROOT, 14)
    await store.audit_record(Actor("bob"), "snapshot.take", "", 15)
    store = await reopen()
    entries = await store.audit_list("", "", 0, 100)
    assert [(e.at, e.user, e.action, e.object) for e in entries] == [
        (15, "bob", "snapshot.take", ""),
        (14, "root", "user.delete", "alice"),
        (13, "root", "token.revoke", "cd" * 16),
        (12, "root", "user.disable", "alice"),
        (11, "root", "user.set_role", "alice -> runner"),
        (10, "root", "user.create", "alice (member)"),
    ]
    assert {(e.token_id, e.peer, e.outcome) for e in entries[1:]} == {
        (ROOT.token_id, ROOT.peer, "ok")
    }
    assert [e.at for e in await store.audit_list("ROOT", "user.", 12, 100)] == [14, 12]
    assert [e.at for e in await store.audit_list("", "token.revoke", 0, 100)] == [13]
    assert [e.at for e in await store.audit_list("", "", 0, 2)] == [15, 14]


async def test_a_failed_change_records_nothing(store: Store) -> None:
    await store.user_create("root", Role.ADMIN, now_us())
    with pytest.raises(AlreadyExists):
        await store.user_create("ROOT", Role.MEMBER, now_us(), ROOT)
    with pytest.raises(FailedPrecondition):
        await store.user_disable("root", now_us(), ROOT)  # the last admin
    assert await store.audit_list("", "", 0, 100) == []


async def test_old_entries_are_pruned(store: Store) -> None:
    for at in (1, 2, 3):
        await store.audit_record(ROOT, "token.login", str(at), at)
    assert await store.audit_prune(3) == 2
    assert [e.object for e in await store.audit_list("", "", 0, 100)] == ["3"]


async def test_quotas_and_config_variables_are_audited(store: Store) -> None:
    await store.quota_set("alice", 10, ROOT, 20)
    var = vs.ConfigVar(name="API_KEY", value="secret", runner=vs.Ref.Runner(any=vs.Ref.RunnerAny()))
    await store.config_set([var], ROOT, 21)
    entries = await store.audit_list("", "", 0, 10)
    assert [(e.action, e.object) for e in entries] == [
        ("config.set", "API_KEY"),  # names only: values may be secrets
        ("quota.set", "alice: 10"),
    ]


async def test_job_and_provisioning_changes_are_audited(store: Store) -> None:
    """Cancels (runner and provisioner jobs, workspace builds), pruning, template
    pushes, workspace create/start/stop/delete and key rotation, each with its change."""
    job_id = await store.job_queue(noop_job(), now_us(), None)
    await store.job_cancel(job_id, 30, actor=ROOT)
    await store.job_cancel(job_id, 31, actor=ROOT)  # already finished: no change, no entry
    await store.jobs_prune(0, ROOT, 32)
    template, version, _ = await store.template_push(push_request("tpl"), "hash", 33, ROOT)
    await store.provisioner_job_acquire(DAEMON, now_us(), HANG, LEASE)
    done = pd.CompletedJob(job_id=version.job_id, template_import=pd.CompletedJob.TemplateImport())
    await store.provisioner_job_complete(DAEMON.id, done, now_us())
    request = pv.CreateWorkspaceRequest(name="ws", owner="alice", template="tpl")
    workspace, build, _ = await store.workspace_create(request, 34, ROOT)
    await store.job_cancel(build.job_id, 35, pq.KIND, ROOT)
    ref = pv.WorkspaceRef(id=workspace.id)
    steps = [(sdk.START, 36), (sdk.STOP, 38), (sdk.DESTROY, 40)]
    for transition, at in steps:
        built = pv.BuildWorkspaceRequest(workspace=ref, transition=transition)
        _, build, _ = await store.workspace_build(built, at, ROOT)
        await store.job_cancel(build.job_id, at + 1, pq.KIND, ROOT)
    key_id = await store.key_rotate(42, ROOT)
    await store.key_rotate(43)  # no actor: not recorded
    await store.key_retire(key_id, 44, ROOT)

    entries = await store.audit_list("", "", 30, 100)
    assert [(e.at, e.action) for e in reversed(entries)] == [
        (30, "job.cancel"),
        (32, "jobs.prune"),
        (33, "template.push"),
        (34, "workspace.create"),
        (35, "provisioner_job.cancel"),
        (36, "workspace.start"),
        (37, "provisioner_job.cancel"),
        (38, "workspace.stop"),
        (39, "provisioner_job.cancel"),
        (40, "workspace.delete"),
        (41, "provisioner_job.cancel"),
        (42, "key.rotate"),
        (44, "key.retire"),
    ]
    assert {(e.user, e.token_id, e.peer, e.outcome) for e in entries} == {
        (ROOT.user, ROOT.token_id, ROOT.peer, "ok")
    }
    objects = {e.at: e.object for e in entries}
    assert objects[30] == f"{job_id} (ended)"
    assert objects[33] == f"tpl@{version.name} job {version.job_id}"
    assert objects[34].startswith("alice/ws build 1 job ")
    assert objects[40].startswith("alice/ws build 4 job ")
    assert objects[42] == key_id == objects[44]
    assert template.name == "tpl"


async def test_failed_job_and_provisioning_changes_record_nothing(store: Store) -> None:
    with pytest.raises(NotFound):
        await store.job_cancel("nope", now_us(), actor=ROOT)
    with pytest.raises(NotFound):
        await store.job_cancel("nope", now_us(), pq.KIND, ROOT)
    with pytest.raises(NotFound):  # no such template
        request = pv.CreateWorkspaceRequest(name="ws", owner="alice", template="nope")
        await store.workspace_create(request, now_us(), ROOT)
    with pytest.raises(NotFound):
        ref = pv.WorkspaceRef(owner="alice", name="nope")
        await store.workspace_build(pv.BuildWorkspaceRequest(workspace=ref), now_us(), ROOT)
    with pytest.raises(NotFound):
        await store.key_retire("nope", now_us(), ROOT)
    only = await store.key_rotate(now_us())
    with pytest.raises(FailedPrecondition):  # the only active key
        await store.key_retire(only, now_us(), ROOT)
    assert await store.audit_list("", "", 0, 100) == []
