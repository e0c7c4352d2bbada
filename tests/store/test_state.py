"""Conformance of the state verbs (store/verbs/state.py): bases, projects, targets, boxes."""

from __future__ import annotations

import pytest

from waystation import testing as t
from waystation.errors import NotFound
from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store import Store

from .conftest import Reopen


async def test_basis_project_target_round_trip_and_survive_a_restart(
    store: Store, reopen: Reopen
) -> None:
    basis = await store.basis_upsert(t.basis("home", "/home/b"))
    assert basis.resource_id
    project = await store.project_upsert(t.project(t.basis_ref(basis), "web", "/home/web"))
    project_ref = t.project_ref(project)
    target = await store.target_upsert(project_ref, t.target("vm1", state=vs.Operation.CREATED))

    store = await reopen()
    assert (await store.basis_get(t.basis_ref(basis))).name == "home"
    assert (await store.basis_find(vs.Basis(path="/home/b"))).resource_id == basis.resource_id
    assert [b.name for b in await store.basis_list()] == ["home"]
    assert (await store.project_get(project_ref)).path == "/home/web"
    assert (await store.project_find(vs.Project(name="web"))).resource_id == project.resource_id
    assert [p.name for p in await store.project_list()] == ["web"]
    got = await store.target_get(project_ref, sdk.Ref.Target(name="vm1"))
    assert got.resource_id == target.resource_id
    assert got.state == vs.Operation.CREATED
    found = await store.target_find(vs.Target(name="vm1", project=project_ref))
    assert found.resource_id == target.resource_id
    assert [x.name for x in await store.target_list()] == ["vm1"]


async def test_deletes_are_durable(store: Store, reopen: Reopen) -> None:
    basis = await store.basis_upsert(t.basis("gone"))
    project = await store.project_upsert(t.project(t.basis_ref(basis), "p"))
    project_ref = t.project_ref(project)
    await store.target_upsert(project_ref, t.target("m"))
    assert await store.target_delete(project_ref, sdk.Ref.Target(name="m"))
    assert not await store.target_delete(project_ref, sdk.Ref.Target(name="m"))
    assert await store.project_delete(project_ref)
    assert await store.basis_delete(t.basis_ref(basis))

    store = await reopen()
    assert await store.target_list() == []
    assert await store.project_list() == []
    with pytest.raises(NotFound):
        await store.basis_get(t.basis_ref(basis))


async def test_boxes_by_version_constraint(store: Store, reopen: Reopen) -> None:
    await store.box_upsert(t.box("acme/os", "1.2.0"))
    await store.box_upsert(t.box("acme/os", "1.3.1"))
    store = await reopen()
    ref = sdk.Ref.Box(name="acme/os", version="1.2.0", provider="virtualbox")
    assert (await store.box_get(ref)).version == "1.2.0"
    best = await store.box_find(sdk.Ref.Box(name="acme/os", version="~> 1.2"))
    assert best is not None and best.version == "1.3.1"
    assert await store.box_find(sdk.Ref.Box(name="acme/os", version=">= 2")) is None
    assert len(await store.box_list()) == 2
    assert await store.box_delete(ref)
    store = await reopen()
    assert [b.version for b in await store.box_list()] == ["1.3.1"]
