"""Conformance of the audit log verbs (store/verbs/audit.py) and of the audited
verbs: the entry is written with the change, and not at all when it fails."""

from __future__ import annotations

import pytest

from waystation.core.roles import Actor, Role
from waystation.errors import AlreadyExists, FailedPrecondition
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store import Store

from .conftest import Reopen, now_us

ROOT = Actor("root", "ab" * 16, "ipv4:127.0.0.1:5000")


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
