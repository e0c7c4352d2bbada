"""Bases and projects over gRPC, on both backends (docs/protocols.md, section 7)."""

from __future__ import annotations

import re

import pytest
from google.protobuf.empty_pb2 import Empty
from grpc import StatusCode

from waystation import testing as t
from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.waystation.v1 import admin_pb2 as admin_pb
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc

ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
FP = StatusCode.FAILED_PRECONDITION


async def upsert_basis(vagrant: vs_grpc.VagrantAsyncStub, basis: vs.Basis) -> vs.Basis:
    resp = await vagrant.UpsertBasis(vs.UpsertBasisRequest(basis=basis))
    return resp.basis


async def upsert_project(vagrant: vs_grpc.VagrantAsyncStub, project: vs.Project) -> vs.Project:
    resp = await vagrant.UpsertProject(vs.UpsertProjectRequest(project=project))
    return resp.project


# -- basis -----------------------------------------------------------------------


async def test_basis_upsert_assigns_ulid_and_round_trips_every_field(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    sent = t.basis(
        name="Home",
        path="/home/me/.vagrant.d",
        metadata=sdk.Args.MetadataSet(metadata={"team": "infra"}),
        configuration=vs.Vagrantfile(raw=b'{"vm": {}}', format=vs.Vagrantfile.JSON),
        remote_enabled=True,
        data_source=vs.Job.DataSource(git=vs.Job.Git(url="https://example.com/r.git", ref="main")),
    )
    got = await upsert_basis(vagrant, sent)
    assert ULID.match(got.resource_id)
    expected = vs.Basis()
    expected.CopyFrom(sent)
    expected.resource_id = got.resource_id
    assert got == expected
    fetched = await vagrant.GetBasis(
        vs.GetBasisRequest(basis=sdk.Ref.Basis(resource_id=got.resource_id))
    )
    assert fetched.basis == expected


async def test_basis_upsert_with_id_replaces_the_record(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    first = await upsert_basis(vagrant, t.basis(name="a", path="/a", remote_enabled=True))
    replaced = await upsert_basis(
        vagrant, vs.Basis(resource_id=first.resource_id, name="b", path="/b")
    )
    assert replaced.resource_id == first.resource_id
    assert (replaced.name, replaced.path, replaced.remote_enabled) == ("b", "/b", False)
    refs = (await vagrant.ListBasis(Empty())).basis
    assert [(r.resource_id, r.name) for r in refs] == [(first.resource_id, "b")]


async def test_basis_upsert_with_unknown_id_is_not_found(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    await t.expect_status(
        vagrant.UpsertBasis(vs.UpsertBasisRequest(basis=t.basis(resource_id="01NOPE"))),
        StatusCode.NOT_FOUND,
        "basis not found",
    )
    assert not (await vagrant.ListBasis(Empty())).basis


@pytest.mark.parametrize(
    ("basis", "code", "fragment"),
    [
        (vs.Basis(path="/p"), FP, "basis name is required"),
        (vs.Basis(name="n"), FP, "basis path is required"),
        (vs.Basis(name="x" * 10240, path="/p"), StatusCode.INVALID_ARGUMENT, "name is too long"),
        (vs.Basis(name="n", path="/" * 5000), StatusCode.INVALID_ARGUMENT, "path is too long"),
        (vs.Basis(name="a\x01b", path="/p"), StatusCode.INVALID_ARGUMENT, "control characters"),
        (vs.Basis(name="a\x00b", path="/p"), StatusCode.INVALID_ARGUMENT, "name contains a NUL"),
        (vs.Basis(name=" padded ", path="/p"), StatusCode.INVALID_ARGUMENT, "whitespace"),
        (vs.Basis(name="n", path="/p\x00"), StatusCode.INVALID_ARGUMENT, "NUL"),
        (
            vs.Basis(name="n", path="/p", resource_id="id with spaces"),
            StatusCode.INVALID_ARGUMENT,
            "resource_id",
        ),
    ],
)
async def test_basis_upsert_rejects_bad_input_and_stores_nothing(
    vagrant: vs_grpc.VagrantAsyncStub, basis: vs.Basis, code: StatusCode, fragment: str
) -> None:
    await t.expect_status(vagrant.UpsertBasis(vs.UpsertBasisRequest(basis=basis)), code, fragment)
    assert not (await vagrant.ListBasis(Empty())).basis


async def test_basis_upsert_without_basis_is_failed_precondition(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    await t.expect_status(vagrant.UpsertBasis(vs.UpsertBasisRequest()), FP, "basis is required")


async def test_basis_names_are_unique_ignoring_case_and_paths_unique(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    first = await upsert_basis(vagrant, t.basis(name="Default", path="/one"))
    await t.expect_status(
        vagrant.UpsertBasis(vs.UpsertBasisRequest(basis=t.basis(name="default", path="/two"))),
        StatusCode.ALREADY_EXISTS,
        f"basis name is already used by basis {first.resource_id}",
    )
    await t.expect_status(
        vagrant.UpsertBasis(vs.UpsertBasisRequest(basis=t.basis(name="other", path="/one"))),
        StatusCode.ALREADY_EXISTS,
        "basis path is already used",
    )
    refs = (await vagrant.ListBasis(Empty())).basis
    assert [r.name for r in refs] == ["Default"]


async def test_basis_find_tries_id_then_name_then_path(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    a = await upsert_basis(vagrant, t.basis(name="alpha", path="/alpha"))
    b = await upsert_basis(vagrant, t.basis(name="beta", path="/beta"))

    async def find(resource_id: str = "", name: str = "", path: str = "") -> str:
        query = vs.Basis(resource_id=resource_id, name=name, path=path)
        resp = await vagrant.FindBasis(vs.FindBasisRequest(basis=query))
        return resp.basis.resource_id

    assert await find(resource_id=a.resource_id, name="beta") == a.resource_id
    assert await find(name="BETA", path="/alpha") == b.resource_id
    assert await find(path="/alpha") == a.resource_id
    assert await find(resource_id="missing", name="missing", path="/beta") == b.resource_id
    await t.expect_status(
        vagrant.FindBasis(vs.FindBasisRequest(basis=vs.Basis(name="gamma"))),
        StatusCode.NOT_FOUND,
        "basis not found: name 'gamma'",
    )
    await t.expect_status(
        vagrant.FindBasis(vs.FindBasisRequest(basis=vs.Basis())), FP, "is required"
    )


async def test_basis_get_is_by_resource_id_only(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    await upsert_basis(vagrant, t.basis(name="only"))
    await t.expect_status(
        vagrant.GetBasis(vs.GetBasisRequest(basis=sdk.Ref.Basis(name="only"))),
        FP,
        "basis resource_id is required",
    )
    await t.expect_status(
        vagrant.GetBasis(vs.GetBasisRequest(basis=sdk.Ref.Basis(resource_id="01UNKNOWN"))),
        StatusCode.NOT_FOUND,
    )


async def test_basis_list_returns_refs(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    made = [await upsert_basis(vagrant, t.basis(name=n)) for n in ("b", "a", "c")]
    refs = (await vagrant.ListBasis(Empty())).basis
    assert [r.name for r in refs] == ["a", "b", "c"]
    assert {r.resource_id for r in refs} == {m.resource_id for m in made}


async def test_oversized_basis_is_rejected_near_and_over_the_message_limit(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    big = sdk.Args.MetadataSet(metadata={"blob": "x" * (3 * 1024 * 1024)})
    await t.expect_status(
        vagrant.UpsertBasis(vs.UpsertBasisRequest(basis=t.basis(metadata=big))),
        StatusCode.INVALID_ARGUMENT,
        "basis is too large",
    )
    huge = sdk.Args.MetadataSet(metadata={"blob": "x" * (5 * 1024 * 1024)})
    await t.expect_status(
        vagrant.UpsertBasis(vs.UpsertBasisRequest(basis=t.basis(metadata=huge))),
        StatusCode.RESOURCE_EXHAUSTED,
    )
    assert not (await vagrant.ListBasis(Empty())).basis


# -- project ---------------------------------------------------------------------


async def test_project_upsert_links_basis_both_ways(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    basis = await upsert_basis(vagrant, t.basis(name="home"))
    project = await upsert_project(vagrant, t.project(sdk.Ref.Basis(name="home"), name="web"))
    assert ULID.match(project.resource_id)
    assert project.basis.resource_id == basis.resource_id
    assert project.basis.name == "home"
    fetched = (
        await vagrant.GetBasis(
            vs.GetBasisRequest(basis=sdk.Ref.Basis(resource_id=basis.resource_id))
        )
    ).basis
    assert [(p.resource_id, p.name) for p in fetched.projects] == [(project.resource_id, "web")]


async def test_project_moving_to_another_basis_updates_both_lists(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    one = await upsert_basis(vagrant, t.basis(name="one"))
    two = await upsert_basis(vagrant, t.basis(name="two"))
    project = await upsert_project(vagrant, t.project(t.basis_ref(one), name="p"))
    project.basis.CopyFrom(t.basis_ref(two))
    moved = await upsert_project(vagrant, project)
    assert moved.resource_id == project.resource_id

    async def projects_of(b: vs.Basis) -> list[str]:
        got = await vagrant.GetBasis(
            vs.GetBasisRequest(basis=sdk.Ref.Basis(resource_id=b.resource_id))
        )
        return [p.resource_id for p in got.basis.projects]

    assert await projects_of(one) == []
    assert await projects_of(two) == [project.resource_id]


async def test_project_needs_an_existing_basis(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    await t.expect_status(
        vagrant.UpsertProject(vs.UpsertProjectRequest(project=vs.Project(name="p", path="/p"))),
        FP,
        "project basis is required",
    )
    await t.expect_status(
        vagrant.UpsertProject(
            vs.UpsertProjectRequest(project=t.project(sdk.Ref.Basis(name="ghost")))
        ),
        FP,
        "project basis does not exist: name 'ghost'",
    )
    assert not (await vagrant.ListProjects(Empty())).projects


async def test_project_names_unique_per_basis_and_paths_unique(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    one = t.basis_ref(await upsert_basis(vagrant, t.basis(name="one")))
    two = t.basis_ref(await upsert_basis(vagrant, t.basis(name="two")))
    await upsert_project(vagrant, t.project(one, name="web", path="/web"))
    await upsert_project(vagrant, t.project(two, name="web", path="/web2"))  # other basis: fine
    await t.expect_status(
        vagrant.UpsertProject(vs.UpsertProjectRequest(project=t.project(one, name="WEB"))),
        StatusCode.ALREADY_EXISTS,
        "project name is already used in basis 'one'",
    )
    await t.expect_status(
        vagrant.UpsertProject(vs.UpsertProjectRequest(project=t.project(one, path="/web2"))),
        StatusCode.ALREADY_EXISTS,
        "project path is already used",
    )
    assert len((await vagrant.ListProjects(Empty())).projects) == 2


async def test_project_find_order_and_ambiguity(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    one = t.basis_ref(await upsert_basis(vagrant, t.basis(name="one")))
    two = t.basis_ref(await upsert_basis(vagrant, t.basis(name="two")))
    p1 = await upsert_project(vagrant, t.project(one, name="web", path="/w1"))
    p2 = await upsert_project(vagrant, t.project(two, name="web", path="/w2"))

    async def find(project: vs.Project) -> str:
        resp = await vagrant.FindProject(vs.FindProjectRequest(project=project))
        return resp.project.resource_id

    assert await find(vs.Project(resource_id=p2.resource_id, name="x")) == p2.resource_id
    assert await find(vs.Project(name="web", basis=sdk.Ref.Basis(name="one"))) == p1.resource_id
    assert await find(vs.Project(path="/w2")) == p2.resource_id
    await t.expect_status(
        vagrant.FindProject(vs.FindProjectRequest(project=vs.Project(name="web"))),
        FP,
        "give the basis too",
    )
    await t.expect_status(
        vagrant.FindProject(vs.FindProjectRequest(project=vs.Project(name="api"))),
        StatusCode.NOT_FOUND,
        "project not found",
    )


async def test_project_list_and_get(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    one = t.basis_ref(await upsert_basis(vagrant, t.basis(name="one")))
    p = await upsert_project(
        vagrant, t.project(one, name="api", metadata=sdk.Args.MetadataSet(metadata={"k": "v"}))
    )
    refs = (await vagrant.ListProjects(Empty())).projects
    assert [(r.resource_id, r.name, r.basis.name) for r in refs] == [(p.resource_id, "api", "one")]
    got = (
        await vagrant.GetProject(
            vs.GetProjectRequest(project=sdk.Ref.Project(resource_id=p.resource_id))
        )
    ).project
    assert got == p
    assert got.metadata.metadata["k"] == "v"


async def test_deleting_a_project_deletes_its_targets(
    vagrant: vs_grpc.VagrantAsyncStub, admin: admin_grpc.AdminAsyncStub
) -> None:
    one = t.basis_ref(await upsert_basis(vagrant, t.basis(name="one")))
    keep = await upsert_project(vagrant, t.project(one, name="keep"))
    gone = await upsert_project(vagrant, t.project(one, name="gone"))
    for project in (keep, gone):
        await vagrant.UpsertTarget(
            vs.UpsertTargetRequest(project=t.project_ref(project), target=t.target(name="vm"))
        )
    resp = await admin.DeleteProject(
        admin_pb.DeleteProjectRequest(project=sdk.Ref.Project(resource_id=gone.resource_id))
    )
    assert resp.deleted
    targets = (await vagrant.ListTargets(Empty())).targets
    assert [x.project.name for x in targets] == ["keep"]
    again = await admin.DeleteProject(
        admin_pb.DeleteProjectRequest(project=sdk.Ref.Project(resource_id=gone.resource_id))
    )
    assert not again.deleted


async def test_deleting_a_basis_deletes_everything_below(
    vagrant: vs_grpc.VagrantAsyncStub, admin: admin_grpc.AdminAsyncStub
) -> None:
    one = t.basis_ref(await upsert_basis(vagrant, t.basis(name="one")))
    project = await upsert_project(vagrant, t.project(one))
    await vagrant.UpsertTarget(
        vs.UpsertTargetRequest(project=t.project_ref(project), target=t.target())
    )
    resp = await admin.DeleteBasis(admin_pb.DeleteBasisRequest(basis=sdk.Ref.Basis(name="one")))
    assert resp.deleted
    assert not (await vagrant.ListBasis(Empty())).basis
    assert not (await vagrant.ListProjects(Empty())).projects
    assert not (await vagrant.ListTargets(Empty())).targets
    await t.expect_status(admin.DeleteBasis(admin_pb.DeleteBasisRequest()), FP, "basis is required")
