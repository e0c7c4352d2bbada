"""Targets and boxes over gRPC, on both backends (docs/protocols.md, section 7)."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta

import pytest
from google.protobuf import any_pb2
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from google.protobuf.struct_pb2 import ListValue, Struct
from google.protobuf.timestamp_pb2 import Timestamp
from google.protobuf.wrappers_pb2 import BoolValue, Int64Value, StringValue
from grpc import StatusCode, aio

from waystation import testing as t
from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc

ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
FP = StatusCode.FAILED_PRECONDITION
INVALID = StatusCode.INVALID_ARGUMENT
PHYS = vs.Operation.PhysicalState


# -- helpers ---------------------------------------------------------------------


async def make_project(vagrant: vs_grpc.VagrantAsyncStub, name: str = "") -> vs.Project:
    """A project in a basis of its own."""
    made = await vagrant.UpsertBasis(vs.UpsertBasisRequest(basis=t.basis()))
    resp = await vagrant.UpsertProject(
        vs.UpsertProjectRequest(project=t.project(t.basis_ref(made.basis), name=name or None))
    )
    return resp.project


async def upsert_target(
    vagrant: vs_grpc.VagrantAsyncStub, project: vs.Project, target: vs.Target
) -> vs.Target:
    resp = await vagrant.UpsertTarget(
        vs.UpsertTargetRequest(project=t.project_ref(project), target=target)
    )
    return resp.target


async def get_target(vagrant: vs_grpc.VagrantAsyncStub, resource_id: str) -> vs.Target:
    resp = await vagrant.GetTarget(
        vs.GetTargetRequest(target=sdk.Ref.Target(resource_id=resource_id))
    )
    return resp.target


async def all_targets(vagrant: vs_grpc.VagrantAsyncStub) -> list[vs.Target]:
    """Every stored target in full: compare before and after a rejected request."""
    refs = (await vagrant.ListTargets(Empty())).targets
    return [await get_target(vagrant, r.resource_id) for r in refs]


async def targets_of(
    vagrant: vs_grpc.VagrantAsyncStub, project: vs.Project
) -> list[tuple[str, str, str]]:
    got = await vagrant.GetProject(
        vs.GetProjectRequest(project=sdk.Ref.Project(resource_id=project.resource_id))
    )
    return [(r.resource_id, r.name, r.project.resource_id) for r in got.project.targets]


async def upsert_box(vagrant: vs_grpc.VagrantAsyncStub, box: vs.Box) -> vs.Box:
    return (await vagrant.UpsertBox(vs.UpsertBoxRequest(box=box))).box


async def get_box(vagrant: vs_grpc.VagrantAsyncStub, ref: sdk.Ref.Box) -> vs.Box:
    return (await vagrant.GetBox(vs.GetBoxRequest(box=ref))).box


async def all_boxes(vagrant: vs_grpc.VagrantAsyncStub) -> list[vs.Box]:
    refs = (await vagrant.ListBoxes(Empty())).boxes
    return [await get_box(vagrant, sdk.Ref.Box(resource_id=r.resource_id)) for r in refs]


def packed(message: Message) -> any_pb2.Any:
    out = any_pb2.Any()
    out.Pack(message)
    return out


def config_data() -> sdk.Args.ConfigData:
    """A Vagrantfile-ish configuration: a Hash of Any keys and values, one nested."""
    inner = sdk.Args.Hash(
        entries=[
            sdk.Args.HashEntry(key=packed(StringValue(value="gui")), value=packed(BoolValue()))
        ]
    )
    return sdk.Args.ConfigData(
        source=sdk.Args.Class(name="VagrantPlugins::Kernel_V2::VMConfig"),
        data=sdk.Args.Hash(
            entries=[
                sdk.Args.HashEntry(
                    key=packed(StringValue(value="box")),
                    value=packed(StringValue(value="hashicorp/bionic64")),
                ),
                sdk.Args.HashEntry(
                    key=packed(StringValue(value="cpus")), value=packed(Int64Value(value=2))
                ),
                sdk.Args.HashEntry(key=packed(StringValue(value="provider")), value=packed(inner)),
            ]
        ),
    )


def recent(ts: Timestamp) -> bool:
    when = ts.ToDatetime(tzinfo=UTC)
    return abs(datetime.now(UTC) - when) < timedelta(minutes=2)


async def outcome(call: Awaitable[object]) -> str:
    """'ok' or the status code's name: for calls with several acceptable answers."""
    try:
        await call
    except aio.AioRpcError as exc:
        return exc.code().name
    return "ok"


# -- target: upsert --------------------------------------------------------------


async def test_target_upsert_assigns_ids_and_round_trips_every_field(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    project = await make_project(vagrant, "web")
    project_ref = t.project_ref(project)
    sent = t.target(
        name="default",
        datadir=sdk.Args.DataDir.Target(
            config_dir="/c", cache_dir="/cache", data_dir="/d", temp_dir="/tmp/x"
        ),
        state=PHYS.CREATED,
        subtargets=[sdk.Ref.Target(resource_id="01SUB", name="sub", project=project_ref)],
        parent=sdk.Ref.Target(resource_id="01PARENT", name="parent", project=project_ref),
        metadata=sdk.Args.MetadataSet(metadata={"team": "infra", "ünïcode": "✓"}),
        configuration=config_data(),
        record=packed(vs.Target.Machine(id="vm-1234", box=t.box())),
        provider="virtualbox",
    )
    got = await upsert_target(vagrant, project, sent)
    assert ULID.match(got.resource_id)
    assert str(uuid.UUID(got.uuid)) == got.uuid
    expected = vs.Target()
    expected.CopyFrom(sent)
    expected.resource_id = got.resource_id
    expected.uuid = got.uuid
    expected.project.CopyFrom(project_ref)
    assert got == expected
    assert await get_target(vagrant, got.resource_id) == expected
    found = await vagrant.FindTarget(
        vs.FindTargetRequest(target=vs.Target(resource_id=got.resource_id))
    )
    assert found.target == expected
    machine = vs.Target.Machine()
    assert got.record.Unpack(machine)
    assert machine.box.name == "hashicorp/bionic64"
    entry = got.configuration.data.entries[1]
    number = Int64Value()
    assert entry.value.Unpack(number)
    assert number.value == 2


async def test_target_upsert_keeps_a_given_uuid(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    project = await make_project(vagrant)
    mine = str(uuid.uuid4())
    got = await upsert_target(vagrant, project, t.target(uuid=mine))
    assert got.uuid == mine
    found = await vagrant.FindTarget(vs.FindTargetRequest(target=vs.Target(uuid=mine)))
    assert found.target.resource_id == got.resource_id


async def test_two_new_targets_get_distinct_ids(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    project = await make_project(vagrant)
    a = await upsert_target(vagrant, project, t.target())
    b = await upsert_target(vagrant, project, t.target())
    assert a.resource_id != b.resource_id
    assert a.uuid != b.uuid


async def test_target_project_comes_from_the_request_or_the_target(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    one = await make_project(vagrant, "one")
    two = await make_project(vagrant, "two")
    by_request = await upsert_target(vagrant, one, t.target(name="a"))
    assert by_request.project.resource_id == one.resource_id
    by_target = (
        await vagrant.UpsertTarget(
            vs.UpsertTargetRequest(
                target=t.target(name="b", project=sdk.Ref.Project(name="two", basis=two.basis))
            )
        )
    ).target
    assert by_target.project == t.project_ref(two)
    # Both given: the request's project wins.
    both = (
        await vagrant.UpsertTarget(
            vs.UpsertTargetRequest(
                project=sdk.Ref.Project(resource_id=one.resource_id),
                target=t.target(name="c", project=sdk.Ref.Project(resource_id=two.resource_id)),
            )
        )
    ).target
    assert both.project.resource_id == one.resource_id
    assert [n for _, n, _ in await targets_of(vagrant, one)] == ["a", "c"]
    assert [n for _, n, _ in await targets_of(vagrant, two)] == ["b"]


async def test_target_upsert_needs_an_existing_project(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    project = await make_project(vagrant, "real")
    await upsert_target(vagrant, project, t.target(name="keep"))
    before = await all_targets(vagrant)
    await t.expect_status(
        vagrant.UpsertTarget(vs.UpsertTargetRequest(target=t.target())),
        FP,
        "target project is required",
    )
    await t.expect_status(
        vagrant.UpsertTarget(
            # A project ref with only a basis identifies no project.
            vs.UpsertTargetRequest(project=sdk.Ref.Project(basis=project.basis), target=t.target())
        ),
        FP,
        "target project is required",
    )
    await t.expect_status(
        vagrant.UpsertTarget(
            vs.UpsertTargetRequest(project=sdk.Ref.Project(name="ghost"), target=t.target())
        ),
        FP,
        "target project does not exist: name 'ghost'",
    )
    await t.expect_status(
        vagrant.UpsertTarget(
            vs.UpsertTargetRequest(
                project=sdk.Ref.Project(resource_id="01NOSUCHPROJECT"), target=t.target()
            )
        ),
        FP,
        "target project does not exist",
    )
    await t.expect_status(
        vagrant.UpsertTarget(
            vs.UpsertTargetRequest(target=t.target(project=sdk.Ref.Project(path="/nowhere")))
        ),
        FP,
        "target project does not exist: path '/nowhere'",
    )
    assert await all_targets(vagrant) == before


@pytest.mark.parametrize(
    ("target", "code", "fragment"),
    [
        (vs.Target(), FP, "target name is required"),
        (vs.Target(name="x" * 10240), INVALID, "target name is too long"),
        (vs.Target(name="x" * 256), INVALID, "target name is too long"),
        (vs.Target(name="a\x00b"), INVALID, "target name contains a NUL byte"),
        (vs.Target(name="red\x1b[31m"), INVALID, "control characters"),
        (vs.Target(name="two\nlines"), INVALID, "control characters"),
        (vs.Target(name="del\x7f"), INVALID, "control characters"),
        (vs.Target(name=" padded"), INVALID, "whitespace"),
        (vs.Target(name="ok", resource_id="id with spaces"), INVALID, "target resource_id"),
        (vs.Target(name="ok", resource_id="x" * 129), INVALID, "target resource_id is too long"),
        (vs.Target(name="ok", uuid="uuid\twith tab"), INVALID, "target uuid"),
        (vs.Target(name="ok", uuid="u" * 10240), INVALID, "target uuid is too long"),
    ],
)
async def test_target_upsert_rejects_bad_input_and_stores_nothing(
    vagrant: vs_grpc.VagrantAsyncStub, target: vs.Target, code: StatusCode, fragment: str
) -> None:
    project = await make_project(vagrant)
    await upsert_target(vagrant, project, t.target(name="ok"))
    before = await all_targets(vagrant)
    await t.expect_status(
        vagrant.UpsertTarget(vs.UpsertTargetRequest(project=t.project_ref(project), target=target)),
        code,
        fragment,
    )
    assert await all_targets(vagrant) == before


async def test_target_upsert_with_unknown_resource_id_is_not_found(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    project = await make_project(vagrant)
    await t.expect_status(
        vagrant.UpsertTarget(
            vs.UpsertTargetRequest(
                project=t.project_ref(project), target=t.target(resource_id="01NOSUCHTARGET")
            )
        ),
        StatusCode.NOT_FOUND,
        "target not found",
    )
    assert await all_targets(vagrant) == []


async def test_target_upsert_by_name_updates_in_place_and_replaces_configuration(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    project = await make_project(vagrant)
    first = await upsert_target(
        vagrant,
        project,
        t.target(
            name="default",
            state=PHYS.CREATED,
            metadata=sdk.Args.MetadataSet(metadata={"a": "1", "b": "2"}),
            configuration=config_data(),
            provider="virtualbox",
            datadir=sdk.Args.DataDir.Target(data_dir="/d"),
        ),
    )
    second = await upsert_target(
        vagrant,
        project,
        t.target(
            name="default",
            state=PHYS.HALTED,
            metadata=sdk.Args.MetadataSet(metadata={"c": "3"}),
        ),
    )
    assert (second.resource_id, second.uuid) == (first.resource_id, first.uuid)
    stored = await get_target(vagrant, first.resource_id)
    assert stored == second
    assert dict(stored.metadata.metadata) == {"c": "3"}
    assert stored.state == PHYS.HALTED
    assert not stored.HasField("configuration")
    assert not stored.HasField("datadir")
    assert stored.provider == ""
    assert await targets_of(vagrant, project) == [
        (first.resource_id, "default", project.resource_id)
    ]


async def test_target_upsert_by_name_ignores_case(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    project = await make_project(vagrant)
    first = await upsert_target(vagrant, project, t.target(name="Web"))
    second = await upsert_target(vagrant, project, t.target(name="WEB", provider="docker"))
    assert (second.resource_id, second.uuid) == (first.resource_id, first.uuid)
    assert second.name == "WEB"
    assert [r.name for r in (await vagrant.ListTargets(Empty())).targets] == ["WEB"]


async def test_target_upsert_by_name_only_matches_within_the_project(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    one = await make_project(vagrant, "one")
    two = await make_project(vagrant, "two")
    a = await upsert_target(vagrant, one, t.target(name="default"))
    b = await upsert_target(vagrant, two, t.target(name="default"))
    assert a.resource_id != b.resource_id
    assert a.uuid != b.uuid
    assert (await get_target(vagrant, a.resource_id)).project.resource_id == one.resource_id
    assert (await get_target(vagrant, b.resource_id)).project.resource_id == two.resource_id


async def test_target_upsert_with_resource_id_renames_and_keeps_uuid(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    project = await make_project(vagrant)
    first = await upsert_target(vagrant, project, t.target(name="db"))
    renamed = await upsert_target(
        vagrant, project, vs.Target(resource_id=first.resource_id, name="database")
    )
    assert (renamed.resource_id, renamed.uuid) == (first.resource_id, first.uuid)
    assert await targets_of(vagrant, project) == [
        (first.resource_id, "database", project.resource_id)
    ]
    await t.expect_status(
        vagrant.GetTarget(
            vs.GetTargetRequest(project=t.project_ref(project), target=sdk.Ref.Target(name="db"))
        ),
        StatusCode.NOT_FOUND,
    )


async def test_target_moves_between_projects_with_its_resource_id(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    one = await make_project(vagrant, "one")
    two = await make_project(vagrant, "two")
    target = await upsert_target(vagrant, one, t.target(name="vm"))
    await upsert_target(vagrant, two, t.target(name="taken"))
    before = await all_targets(vagrant)
    await t.expect_status(
        vagrant.UpsertTarget(
            vs.UpsertTargetRequest(
                project=t.project_ref(two),
                target=vs.Target(resource_id=target.resource_id, name="TAKEN"),
            )
        ),
        StatusCode.ALREADY_EXISTS,
        "target name is already used in project 'two'",
    )
    assert await all_targets(vagrant) == before
    moved = await upsert_target(vagrant, two, vs.Target(resource_id=target.resource_id, name="vm"))
    assert moved.project == t.project_ref(two)
    assert moved.uuid == target.uuid
    assert await targets_of(vagrant, one) == []
    assert [n for _, n, _ in await targets_of(vagrant, two)] == ["taken", "vm"]


async def test_target_uuid_must_be_unique(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    one = await make_project(vagrant, "one")
    two = await make_project(vagrant, "two")
    shared = str(uuid.uuid4())
    first = await upsert_target(vagrant, one, t.target(name="a", uuid=shared))
    before = await all_targets(vagrant)
    for project in (one, two):
        await t.expect_status(
            vagrant.UpsertTarget(
                vs.UpsertTargetRequest(
                    project=t.project_ref(project), target=t.target(name="b", uuid=shared)
                )
            ),
            StatusCode.ALREADY_EXISTS,
            f"target uuid is already used by target {first.resource_id}",
        )
    assert await all_targets(vagrant) == before
    # Its own uuid is no conflict.
    again = await upsert_target(
        vagrant, one, vs.Target(resource_id=first.resource_id, name="a", uuid=shared)
    )
    assert again.uuid == shared


async def test_target_names_are_unique_per_project_ignoring_case(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    one = await make_project(vagrant, "one")
    two = await make_project(vagrant, "two")
    web = await upsert_target(vagrant, one, t.target(name="web"))
    db = await upsert_target(vagrant, one, t.target(name="db"))
    other = await upsert_target(vagrant, two, t.target(name="web"))  # other project: fine
    assert other.resource_id != web.resource_id
    before = await all_targets(vagrant)
    await t.expect_status(
        vagrant.UpsertTarget(
            vs.UpsertTargetRequest(
                project=t.project_ref(one),
                target=vs.Target(resource_id=db.resource_id, name="WEB"),
            )
        ),
        StatusCode.ALREADY_EXISTS,
        f"target name is already used in project 'one' by target {web.resource_id}",
    )
    assert await all_targets(vagrant) == before


async def test_oversized_target_is_rejected(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    project = await make_project(vagrant)
    big = sdk.Args.MetadataSet(metadata={"blob": "x" * (2 * 1024 * 1024)})
    await t.expect_status(
        vagrant.UpsertTarget(
            vs.UpsertTargetRequest(project=t.project_ref(project), target=t.target(metadata=big))
        ),
        INVALID,
        "target is too large",
    )
    assert await all_targets(vagrant) == []


# -- target: project list, delete, get, find, list -------------------------------


async def test_project_targets_list_follows_upserts_and_deletes(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    project = await make_project(vagrant, "web")
    b = await upsert_target(vagrant, project, t.target(name="b"))
    a = await upsert_target(vagrant, project, t.target(name="a"))
    got = (
        await vagrant.GetProject(
            vs.GetProjectRequest(project=sdk.Ref.Project(resource_id=project.resource_id))
        )
    ).project
    assert [(r.resource_id, r.name) for r in got.targets] == [
        (a.resource_id, "a"),
        (b.resource_id, "b"),
    ]
    assert all(r.project.resource_id == project.resource_id for r in got.targets)
    assert all(r.project.name == "web" for r in got.targets)
    await vagrant.DeleteTarget(
        vs.DeleteTargetRequest(target=sdk.Ref.Target(resource_id=a.resource_id))
    )
    assert await targets_of(vagrant, project) == [(b.resource_id, "b", project.resource_id)]
    await vagrant.DeleteTarget(
        vs.DeleteTargetRequest(project=t.project_ref(project), target=sdk.Ref.Target(name="b"))
    )
    assert await targets_of(vagrant, project) == []


async def test_delete_target_by_id_and_by_name_within_project(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    one = await make_project(vagrant, "one")
    two = await make_project(vagrant, "two")
    in_one = await upsert_target(vagrant, one, t.target(name="vm"))
    in_two = await upsert_target(vagrant, two, t.target(name="vm"))
    await vagrant.DeleteTarget(
        vs.DeleteTargetRequest(
            project=sdk.Ref.Project(resource_id=two.resource_id),
            target=sdk.Ref.Target(name="VM"),
        )
    )
    assert [r.resource_id for r in (await vagrant.ListTargets(Empty())).targets] == [
        in_one.resource_id
    ]
    await vagrant.DeleteTarget(
        vs.DeleteTargetRequest(target=sdk.Ref.Target(resource_id=in_one.resource_id))
    )
    assert not (await vagrant.ListTargets(Empty())).targets
    await t.expect_status(
        vagrant.GetTarget(
            vs.GetTargetRequest(target=sdk.Ref.Target(resource_id=in_two.resource_id))
        ),
        StatusCode.NOT_FOUND,
    )


async def test_delete_missing_target_is_a_no_op(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    project = await make_project(vagrant, "one")
    keep = await upsert_target(vagrant, project, t.target(name="keep"))
    before = await all_targets(vagrant)
    await vagrant.DeleteTarget(
        vs.DeleteTargetRequest(target=sdk.Ref.Target(resource_id="01NOSUCHTARGET"))
    )
    await vagrant.DeleteTarget(
        vs.DeleteTargetRequest(project=t.project_ref(project), target=sdk.Ref.Target(name="gone"))
    )
    await vagrant.DeleteTarget(
        vs.DeleteTargetRequest(
            project=sdk.Ref.Project(name="ghost"), target=sdk.Ref.Target(name="keep")
        )
    )
    # Deleting twice is fine too.
    other = await upsert_target(vagrant, project, t.target(name="other"))
    for _ in range(2):
        await vagrant.DeleteTarget(
            vs.DeleteTargetRequest(target=sdk.Ref.Target(resource_id=other.resource_id))
        )
    assert await all_targets(vagrant) == before
    assert [r.resource_id for r in (await vagrant.ListTargets(Empty())).targets] == [
        keep.resource_id
    ]


async def test_delete_target_rejects_requests_that_identify_nothing(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    project = await make_project(vagrant)
    await upsert_target(vagrant, project, t.target(name="vm"))
    before = await all_targets(vagrant)
    await t.expect_status(
        vagrant.DeleteTarget(
            vs.DeleteTargetRequest(project=t.project_ref(project), target=sdk.Ref.Target())
        ),
        FP,
        "target resource_id or name is required",
    )
    await t.expect_status(
        vagrant.DeleteTarget(vs.DeleteTargetRequest(target=sdk.Ref.Target(name="vm"))),
        FP,
        "target project is required",
    )
    assert await all_targets(vagrant) == before


async def test_get_target_by_id_and_by_name_within_the_request_project(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    one = await make_project(vagrant, "one")
    two = await make_project(vagrant, "two")
    a = await upsert_target(vagrant, one, t.target(name="alpha", provider="docker"))
    b = await upsert_target(vagrant, two, t.target(name="beta"))
    assert await get_target(vagrant, a.resource_id) == a

    async def by_name(project: vs.Project, name: str) -> vs.Target:
        resp = await vagrant.GetTarget(
            vs.GetTargetRequest(project=t.project_ref(project), target=sdk.Ref.Target(name=name))
        )
        return resp.target

    assert await by_name(one, "alpha") == a
    assert await by_name(one, "ALPHA") == a
    assert await by_name(two, "beta") == b
    await t.expect_status(by_name(two, "alpha"), StatusCode.NOT_FOUND, "target not found")
    await t.expect_status(
        vagrant.GetTarget(vs.GetTargetRequest(target=sdk.Ref.Target(resource_id="01NOSUCHTARGET"))),
        StatusCode.NOT_FOUND,
        "target not found",
    )
    await t.expect_status(
        vagrant.GetTarget(
            vs.GetTargetRequest(
                project=sdk.Ref.Project(name="ghost"), target=sdk.Ref.Target(name="alpha")
            )
        ),
        StatusCode.NOT_FOUND,
    )
    await t.expect_status(
        vagrant.GetTarget(vs.GetTargetRequest(target=sdk.Ref.Target(name="alpha"))),
        FP,
        "target project is required",
    )
    await t.expect_status(
        vagrant.GetTarget(vs.GetTargetRequest(project=t.project_ref(one), target=sdk.Ref.Target())),
        FP,
        "target resource_id or name is required",
    )


async def test_find_target_tries_id_then_name_in_project_then_uuid(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    one = await make_project(vagrant, "one")
    two = await make_project(vagrant, "two")
    a = await upsert_target(vagrant, one, t.target(name="alpha"))
    b = await upsert_target(vagrant, one, t.target(name="beta"))
    c = await upsert_target(vagrant, two, t.target(name="alpha"))
    one_ref = sdk.Ref.Project(resource_id=one.resource_id)
    two_ref = sdk.Ref.Project(name="two", basis=two.basis)

    async def find(target: vs.Target) -> str:
        resp = await vagrant.FindTarget(vs.FindTargetRequest(target=target))
        return resp.target.resource_id

    assert (
        await find(vs.Target(resource_id=a.resource_id, name="beta", project=one_ref, uuid=c.uuid))
        == a.resource_id
    )
    assert await find(vs.Target(resource_id=a.resource_id)) == a.resource_id
    assert (
        await find(vs.Target(resource_id="01MISSING", name="beta", project=one_ref, uuid=c.uuid))
        == b.resource_id
    )
    assert await find(vs.Target(name="alpha", project=two_ref)) == c.resource_id
    assert await find(vs.Target(name="ALPHA", project=one_ref)) == a.resource_id
    assert await find(vs.Target(name="gamma", project=one_ref, uuid=b.uuid)) == b.resource_id
    assert await find(vs.Target(uuid=c.uuid)) == c.resource_id
    assert await find(vs.Target(resource_id="01MISSING", uuid=a.uuid)) == a.resource_id
    full = await vagrant.FindTarget(vs.FindTargetRequest(target=vs.Target(uuid=b.uuid)))
    assert full.target == b


async def test_find_target_not_found_and_missing_identifiers(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    project = await make_project(vagrant, "one")
    await upsert_target(vagrant, project, t.target(name="alpha"))
    ref = sdk.Ref.Project(resource_id=project.resource_id)

    async def find(target: vs.Target) -> vs.FindTargetResponse:
        return await vagrant.FindTarget(vs.FindTargetRequest(target=target))

    nf = StatusCode.NOT_FOUND
    await t.expect_status(find(vs.Target(resource_id="01MISSING")), nf, "target not found")
    await t.expect_status(find(vs.Target(name="gamma", project=ref)), nf, "target not found")
    await t.expect_status(find(vs.Target(uuid=str(uuid.uuid4()))), nf, "target not found")
    await t.expect_status(find(vs.Target(name="alpha", project=sdk.Ref.Project(name="ghost"))), nf)
    required = "target resource_id, name or uuid is required"
    await t.expect_status(find(vs.Target()), FP, required)
    await t.expect_status(find(vs.Target(project=ref, provider="docker")), FP, required)
    await t.expect_status(find(vs.Target(name="alpha")), FP, "target project is required")


async def test_find_target_not_found_message_names_the_uuid(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    wanted = str(uuid.uuid4())
    await t.expect_status(
        vagrant.FindTarget(vs.FindTargetRequest(target=vs.Target(uuid=wanted))),
        StatusCode.NOT_FOUND,
        wanted,
    )


async def test_list_targets_returns_refs_with_their_project(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    assert not (await vagrant.ListTargets(Empty())).targets
    alpha = await make_project(vagrant, "alpha")
    beta = await make_project(vagrant, "beta")
    made = [
        await upsert_target(vagrant, beta, t.target(name="z")),
        await upsert_target(vagrant, alpha, t.target(name="y")),
        await upsert_target(vagrant, beta, t.target(name="a")),
    ]
    refs = (await vagrant.ListTargets(Empty())).targets
    assert [(r.project.name, r.name) for r in refs] == [
        ("alpha", "y"),
        ("beta", "a"),
        ("beta", "z"),
    ]
    by_id = {m.resource_id: m for m in made}
    assert set(by_id) == {r.resource_id for r in refs}
    for r in refs:
        assert r.project.resource_id == by_id[r.resource_id].project.resource_id


@pytest.mark.parametrize(
    "call",
    [
        lambda v: v.UpsertTarget(vs.UpsertTargetRequest()),
        lambda v: v.UpsertTarget(
            vs.UpsertTargetRequest(project=sdk.Ref.Project(resource_id="01X"))
        ),
        lambda v: v.GetTarget(vs.GetTargetRequest()),
        lambda v: v.FindTarget(vs.FindTargetRequest()),
        lambda v: v.DeleteTarget(
            vs.DeleteTargetRequest(project=sdk.Ref.Project(resource_id="01X"))
        ),
    ],
    ids=["upsert", "upsert-project-only", "get", "find", "delete"],
)
async def test_target_requests_without_a_target_are_failed_precondition(
    vagrant: vs_grpc.VagrantAsyncStub, call: Callable[[vs_grpc.VagrantAsyncStub], Awaitable[object]]
) -> None:
    project = await make_project(vagrant)
    await upsert_target(vagrant, project, t.target())
    before = await all_targets(vagrant)
    await t.expect_status(call(vagrant), FP, "target is required")
    assert await all_targets(vagrant) == before


@pytest.mark.parametrize(
    ("call", "allowed"),
    [
        (
            lambda v, p: v.GetTarget(
                vs.GetTargetRequest(project=p, target=sdk.Ref.Target(name="a\x00b"))
            ),
            {"INVALID_ARGUMENT"},
        ),
        (
            lambda v, p: v.GetTarget(
                vs.GetTargetRequest(target=sdk.Ref.Target(resource_id="a\x00b"))
            ),
            {"INVALID_ARGUMENT"},
        ),
        (
            lambda v, p: v.FindTarget(vs.FindTargetRequest(target=vs.Target(uuid="a\x00b"))),
            {"INVALID_ARGUMENT"},
        ),
        (
            lambda v, p: v.DeleteTarget(
                vs.DeleteTargetRequest(project=p, target=sdk.Ref.Target(name="a\x00b"))
            ),
            {"INVALID_ARGUMENT"},
        ),
        (
            lambda v, p: v.UpsertTarget(
                vs.UpsertTargetRequest(project=sdk.Ref.Project(name="a\x00b"), target=t.target())
            ),
            {"INVALID_ARGUMENT"},
        ),
    ],
    ids=["get-by-name", "get-by-id", "find-by-uuid", "delete-by-name", "upsert-project-name"],
)
async def test_target_lookups_with_nul_bytes_are_invalid_argument(
    vagrant: vs_grpc.VagrantAsyncStub,
    request: pytest.FixtureRequest,
    backend_url: str,
    call: Callable[[vs_grpc.VagrantAsyncStub, sdk.Ref.Project], Awaitable[object]],
    allowed: set[str],
) -> None:
    project = await make_project(vagrant)
    await upsert_target(vagrant, project, t.target(name="ab"))
    before = await all_targets(vagrant)
    assert await outcome(call(vagrant, t.project_ref(project))) in allowed
    assert await all_targets(vagrant) == before


# -- box: upsert -----------------------------------------------------------------


def box_metadata() -> Struct:
    s = Struct()
    s.update(
        {
            "name": "hashicorp/bionic64",
            "description": "Ubuntu 18.04 ✓",
            "providers": [{"name": "virtualbox", "checksum": "abc"}],
            "count": 3,
            "ok": True,
            "none": None,
        }
    )
    return s


async def test_box_upsert_round_trips_every_field_and_sets_last_update(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    sent = t.box(
        resource_id="box-bionic-1",
        metadata=box_metadata(),
        metadata_url="https://vagrantcloud.com/hashicorp/bionic64",
        last_update=Timestamp(seconds=946684800),  # the client's value is ignored
    )
    got = await upsert_box(vagrant, sent)
    assert got.resource_id == "box-bionic-1"
    assert recent(got.last_update)
    expected = vs.Box()
    expected.CopyFrom(sent)
    expected.last_update.CopyFrom(got.last_update)
    assert got == expected
    assert await get_box(vagrant, sdk.Ref.Box(resource_id="box-bionic-1")) == expected
    by_key = sdk.Ref.Box(name=sent.name, version=sent.version, provider=sent.provider)
    assert await get_box(vagrant, by_key) == expected
    providers = got.metadata["providers"]
    assert isinstance(providers, ListValue)
    first = providers[0]
    assert isinstance(first, Struct)
    assert first["name"] == "virtualbox"


async def test_box_without_resource_id_gets_one(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    got = await upsert_box(vagrant, t.box())
    assert ULID.match(got.resource_id)
    assert await get_box(vagrant, sdk.Ref.Box(resource_id=got.resource_id)) == got


@pytest.mark.parametrize(
    ("box", "code", "fragment"),
    [
        (
            vs.Box(provider="virtualbox", directory="/d", version="1.0.0"),
            FP,
            "box name is required",
        ),
        (vs.Box(name="n", directory="/d", version="1.0.0"), FP, "box provider is required"),
        (vs.Box(name="n", provider="virtualbox", version="1.0.0"), FP, "box directory is required"),
        (t.box(name="x" * 10240), INVALID, "box name is too long"),
        (t.box(name="a\x00b"), INVALID, "contains a NUL byte"),
        (t.box(provider="virtual\nbox"), INVALID, "box provider contains control characters"),
        (t.box(provider="p" * 10240), INVALID, "box provider is too long"),
        (t.box(directory="/boxes/\x00"), INVALID, "box directory contains a NUL byte"),
        (t.box(directory="/" * 5000), INVALID, "box directory is too long"),
        (t.box(resource_id="id with spaces"), INVALID, "box resource_id"),
        (t.box(resource_id="x" * 10240), INVALID, "box resource_id is too long"),
        (t.box(version="1.x", directory="/d"), INVALID, "box version is invalid"),
        (t.box(version="banana", directory="/d"), INVALID, "box version is invalid"),
        (t.box(version=" 1.0.0", directory="/d"), INVALID, "box version is invalid"),
        (t.box(version="1.0.0\x00", directory="/d"), INVALID, "box version contains a NUL byte"),
        (t.box(version=">= 1.0", directory="/d"), INVALID, "box version is invalid"),
        (t.box(version="1." * 200 + "0", directory="/d"), INVALID, "box version is invalid"),
        (
            t.box(version="99999999999999999999.0", directory="/d"),
            INVALID,
            "box version is invalid",
        ),
    ],
)
async def test_box_upsert_rejects_bad_input_and_stores_nothing(
    vagrant: vs_grpc.VagrantAsyncStub, box: vs.Box, code: StatusCode, fragment: str
) -> None:
    await upsert_box(vagrant, t.box(name="existing", resource_id="keep"))
    before = await all_boxes(vagrant)
    await t.expect_status(vagrant.UpsertBox(vs.UpsertBoxRequest(box=box)), code, fragment)
    assert await all_boxes(vagrant) == before


async def test_box_version_empty_or_zero_is_stored_as_0_0_0(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    empty = await upsert_box(vagrant, t.box(version="", directory="/one"))
    assert empty.version == "0.0.0"
    zero = await upsert_box(vagrant, t.box(version="0", directory="/two"))
    assert zero.version == "0.0.0"
    assert zero.resource_id == empty.resource_id  # same (name, version, provider)
    refs = (await vagrant.ListBoxes(Empty())).boxes
    assert [(r.version, r.resource_id) for r in refs] == [("0.0.0", empty.resource_id)]
    got = await get_box(vagrant, sdk.Ref.Box(name=zero.name, provider=zero.provider))
    assert got.directory == "/two"
    assert got.version == "0.0.0"


async def test_get_box_with_version_zero_finds_the_0_0_0_box(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    box = await upsert_box(vagrant, t.box(version="0"))
    ref = sdk.Ref.Box(name=box.name, version="0", provider=box.provider)
    assert await get_box(vagrant, ref) == box


async def test_delete_box_with_version_zero_deletes_the_0_0_0_box(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    box = await upsert_box(vagrant, t.box(version="0"))
    ref = sdk.Ref.Box(name=box.name, version="0", provider=box.provider)
    await vagrant.DeleteBox(vs.DeleteBoxRequest(box=ref))
    assert not (await vagrant.ListBoxes(Empty())).boxes


async def test_box_reupsert_with_same_id_replaces_and_refreshes_last_update(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    first = await upsert_box(
        vagrant,
        t.box(
            resource_id="b1",
            name="one",
            version="1.0.0",
            metadata=box_metadata(),
            metadata_url="https://example.com/one",
        ),
    )
    await asyncio.sleep(0.05)
    second = await upsert_box(
        vagrant, t.box(resource_id="b1", name="two", version="2.0.0", provider="libvirt")
    )
    assert second.resource_id == "b1"
    assert second.last_update.ToNanoseconds() > first.last_update.ToNanoseconds()
    assert recent(second.last_update)
    stored = await get_box(vagrant, sdk.Ref.Box(resource_id="b1"))
    assert stored == second
    assert (stored.name, stored.version, stored.provider) == ("two", "2.0.0", "libvirt")
    assert not stored.HasField("metadata")
    assert stored.metadata_url == ""
    await t.expect_status(
        vagrant.GetBox(
            vs.GetBoxRequest(box=sdk.Ref.Box(name="one", version="1.0.0", provider="virtualbox"))
        ),
        StatusCode.NOT_FOUND,
    )
    refs = (await vagrant.ListBoxes(Empty())).boxes
    assert [(r.resource_id, r.name) for r in refs] == [("b1", "two")]


async def test_box_upsert_without_id_updates_the_existing_key_in_place(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    first = await upsert_box(vagrant, t.box(resource_id="mine", directory="/one"))
    await asyncio.sleep(0.05)
    second = await upsert_box(vagrant, t.box(directory="/two", metadata_url="https://x/y"))
    assert second.resource_id == "mine"
    assert second.last_update.ToNanoseconds() > first.last_update.ToNanoseconds()
    stored = await get_box(vagrant, sdk.Ref.Box(resource_id="mine"))
    assert (stored.directory, stored.metadata_url) == ("/two", "https://x/y")
    assert len((await vagrant.ListBoxes(Empty())).boxes) == 1


async def test_box_name_version_provider_is_unique(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    await upsert_box(vagrant, t.box(resource_id="a", version="1.0.0"))
    await upsert_box(vagrant, t.box(resource_id="b", version="2.0.0"))
    before = await all_boxes(vagrant)
    await t.expect_status(
        vagrant.UpsertBox(vs.UpsertBoxRequest(box=t.box(resource_id="c", version="1.0.0"))),
        StatusCode.ALREADY_EXISTS,
        "box name, version and provider is already used by box a",
    )
    await t.expect_status(
        vagrant.UpsertBox(vs.UpsertBoxRequest(box=t.box(resource_id="b", version="1.0.0"))),
        StatusCode.ALREADY_EXISTS,
        "already used by box a",
    )
    assert await all_boxes(vagrant) == before
    # Another provider or name is another box.
    await upsert_box(vagrant, t.box(resource_id="d", version="1.0.0", provider="libvirt"))
    await upsert_box(vagrant, t.box(resource_id="e", name="other/box", version="1.0.0"))
    assert len((await vagrant.ListBoxes(Empty())).boxes) == 4


# -- box: get, delete, list ------------------------------------------------------


async def test_get_box_by_id_and_by_key(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    box = await upsert_box(vagrant, t.box(resource_id="k1", version="1.2.3"))
    assert await get_box(vagrant, sdk.Ref.Box(resource_id="k1")) == box
    assert (
        await get_box(vagrant, sdk.Ref.Box(name=box.name, version="1.2.3", provider=box.provider))
        == box
    )
    nf = StatusCode.NOT_FOUND
    for ref in (
        sdk.Ref.Box(resource_id="nope"),
        sdk.Ref.Box(name=box.name, version="9.9.9", provider=box.provider),
        sdk.Ref.Box(name=box.name, version="1.2.3", provider="vmware"),
        sdk.Ref.Box(name="other", version="1.2.3", provider=box.provider),
        sdk.Ref.Box(name=box.name, provider=box.provider),  # means 0.0.0
    ):
        await t.expect_status(vagrant.GetBox(vs.GetBoxRequest(box=ref)), nf, "box not found")
    for ref in (sdk.Ref.Box(), sdk.Ref.Box(name=box.name), sdk.Ref.Box(provider="virtualbox")):
        await t.expect_status(
            vagrant.GetBox(vs.GetBoxRequest(box=ref)),
            FP,
            "box resource_id, or name and provider, is required",
        )


async def test_delete_box_by_id_and_by_key(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    a = await upsert_box(vagrant, t.box(resource_id="a", version="1.0.0"))
    await upsert_box(vagrant, t.box(resource_id="b", version="2.0.0"))
    c = await upsert_box(vagrant, t.box(resource_id="c", version="3.0.0"))
    await vagrant.DeleteBox(vs.DeleteBoxRequest(box=sdk.Ref.Box(resource_id="b")))
    await vagrant.DeleteBox(
        vs.DeleteBoxRequest(box=sdk.Ref.Box(name=c.name, version="3.0.0", provider=c.provider))
    )
    assert [r.resource_id for r in (await vagrant.ListBoxes(Empty())).boxes] == ["a"]
    await t.expect_status(
        vagrant.GetBox(vs.GetBoxRequest(box=sdk.Ref.Box(resource_id="b"))), StatusCode.NOT_FOUND
    )
    # Missing boxes: no-op successes.
    before = await all_boxes(vagrant)
    await vagrant.DeleteBox(vs.DeleteBoxRequest(box=sdk.Ref.Box(resource_id="b")))
    await vagrant.DeleteBox(vs.DeleteBoxRequest(box=sdk.Ref.Box(resource_id="never")))
    await vagrant.DeleteBox(
        vs.DeleteBoxRequest(box=sdk.Ref.Box(name=a.name, version="9.0.0", provider=a.provider))
    )
    await t.expect_status(
        vagrant.DeleteBox(vs.DeleteBoxRequest(box=sdk.Ref.Box(name=a.name))),
        FP,
        "box resource_id, or name and provider, is required",
    )
    assert await all_boxes(vagrant) == before


async def test_list_boxes_returns_sorted_refs(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    assert not (await vagrant.ListBoxes(Empty())).boxes
    for rid, name, provider, version in [
        ("1", "b/box", "virtualbox", "1.0.0"),
        ("2", "a/box", "virtualbox", "2.0.0"),
        ("3", "a/box", "libvirt", "1.0.0"),
        ("4", "a/box", "virtualbox", "1.0.0"),
    ]:
        await upsert_box(
            vagrant, t.box(resource_id=rid, name=name, provider=provider, version=version)
        )
    refs = (await vagrant.ListBoxes(Empty())).boxes
    assert [(r.resource_id, r.name, r.provider, r.version) for r in refs] == [
        ("3", "a/box", "libvirt", "1.0.0"),
        ("4", "a/box", "virtualbox", "1.0.0"),
        ("2", "a/box", "virtualbox", "2.0.0"),
        ("1", "b/box", "virtualbox", "1.0.0"),
    ]


# -- box: find -------------------------------------------------------------------

FIND_VERSIONS = ["0.9", "1.0.0", "1.2.5", "1.10.0", "2.0.0-beta", "2.0.0"]


async def seed_find(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    for version in FIND_VERSIONS:
        await upsert_box(vagrant, t.box(resource_id=f"vb-{version}", version=version))
    await upsert_box(vagrant, t.box(resource_id="lv-3", version="3.0.0", provider="libvirt"))
    await upsert_box(vagrant, t.box(resource_id="other-9", name="other/box", version="9.0.0"))


@pytest.mark.parametrize(
    ("constraint", "provider", "expected"),
    [
        ("", "virtualbox", "vb-2.0.0"),
        ("", "", "lv-3"),
        ("  ", "virtualbox", "vb-2.0.0"),
        (">= 1.0, < 2", "virtualbox", "vb-1.10.0"),
        (">=1.0,<2", "virtualbox", "vb-1.10.0"),
        ("~> 1.2", "virtualbox", "vb-1.10.0"),
        ("~> 1.2.0", "virtualbox", "vb-1.2.5"),
        ("~> 1.0", "", "vb-1.10.0"),
        ("~> 0.9", "virtualbox", "vb-0.9"),
        ("= 1.0.0", "virtualbox", "vb-1.0.0"),
        ("1.0.0", "virtualbox", "vb-1.0.0"),
        ("= 1.0", "virtualbox", "vb-1.0.0"),
        ("= 0.9.0", "virtualbox", "vb-0.9"),
        ("< 1.0", "virtualbox", "vb-0.9"),
        ("< 1.10", "virtualbox", "vb-1.2.5"),
        ("> 1.2.5", "virtualbox", "vb-2.0.0"),
        # A prerelease only satisfies an ordering constraint naming a prerelease of it.
        ("< 2.0.0", "virtualbox", "vb-1.10.0"),
        ("< 2.0.1", "virtualbox", "vb-2.0.0"),
        (">= 2.0.0-alpha, < 2.0.0-rc", "virtualbox", "vb-2.0.0-beta"),
        (">= 2.0.0-alpha, < 2.0.0", "virtualbox", None),
        (">= 1.10.0, < 2.0.0-rc", "virtualbox", "vb-1.10.0"),
        (">= 2.0.0-alpha", "virtualbox", "vb-2.0.0"),
        ("= 2.0.0-beta", "virtualbox", "vb-2.0.0-beta"),
        ("~> 2.0.0-alpha, != 2.0.0", "virtualbox", "vb-2.0.0-beta"),
        # `=` and `!=` skip the prerelease rule in go-version.
        ("!= 2.0.0", "virtualbox", "vb-2.0.0-beta"),
        (">= 1.0, != 2.0.0", "virtualbox", "vb-1.10.0"),
        (">= 3", "libvirt", "lv-3"),
        (">= 3", "", "lv-3"),
        ("< 3", "", "vb-2.0.0"),
        (">= 3", "virtualbox", None),
        ("> 1.10.0, < 2.0.0", "virtualbox", None),
        ("< 0.9", "virtualbox", None),
        ("= 1.5", "", None),
        ("", "vmware", None),
    ],
)
async def test_find_box_picks_the_highest_matching_version(
    vagrant: vs_grpc.VagrantAsyncStub, constraint: str, provider: str, expected: str | None
) -> None:
    await seed_find(vagrant)
    resp = await vagrant.FindBox(
        vs.FindBoxRequest(
            box=sdk.Ref.Box(name="hashicorp/bionic64", version=constraint, provider=provider)
        )
    )
    if expected is None:
        assert not resp.HasField("box")
        assert resp == vs.FindBoxResponse()
        return
    assert resp.HasField("box")
    assert resp.box.resource_id == expected
    assert resp.box == await get_box(vagrant, sdk.Ref.Box(resource_id=expected))


async def test_find_box_unknown_name_is_an_empty_response(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    await seed_find(vagrant)
    for ref in (
        sdk.Ref.Box(name="nobody/nothing"),
        sdk.Ref.Box(name="HASHICORP/BIONIC64"),
        sdk.Ref.Box(name="nobody/nothing", version=">= 0", provider="virtualbox"),
    ):
        resp = await vagrant.FindBox(vs.FindBoxRequest(box=ref))
        assert resp == vs.FindBoxResponse()
    empty = await vagrant.FindBox(
        vs.FindBoxRequest(box=sdk.Ref.Box(name="hashicorp/bionic64", version="> 100"))
    )
    assert not empty.HasField("box")


@pytest.mark.parametrize(
    "constraint",
    [
        "~>",
        ">>1",
        "x" * 10240,
        ">= " + "1." * 600 + "0",
        "1.x",
        "banana",
        ">= 1.0,",
        ", >= 1",
        "=> 1.0",
        "1.0 2.0",
        "~> banana",
        ">= 1.0 || < 3",
    ],
)
async def test_find_box_bad_constraint_is_invalid_argument(
    vagrant: vs_grpc.VagrantAsyncStub, constraint: str
) -> None:
    await seed_find(vagrant)
    before = await all_boxes(vagrant)
    await t.expect_status(
        vagrant.FindBox(
            vs.FindBoxRequest(box=sdk.Ref.Box(name="hashicorp/bionic64", version=constraint))
        ),
        INVALID,
        "box version constraint is invalid",
    )
    assert await all_boxes(vagrant) == before


async def test_find_box_needs_a_name(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    await seed_find(vagrant)
    for ref in (sdk.Ref.Box(), sdk.Ref.Box(version=">= 1.0", provider="virtualbox")):
        await t.expect_status(
            vagrant.FindBox(vs.FindBoxRequest(box=ref)), FP, "box name is required"
        )


@pytest.mark.parametrize(
    "call",
    [
        lambda v: v.UpsertBox(vs.UpsertBoxRequest()),
        lambda v: v.GetBox(vs.GetBoxRequest()),
        lambda v: v.DeleteBox(vs.DeleteBoxRequest()),
        lambda v: v.FindBox(vs.FindBoxRequest()),
    ],
    ids=["upsert", "get", "delete", "find"],
)
async def test_box_requests_without_a_box_are_failed_precondition(
    vagrant: vs_grpc.VagrantAsyncStub, call: Callable[[vs_grpc.VagrantAsyncStub], Awaitable[object]]
) -> None:
    await upsert_box(vagrant, t.box(resource_id="keep"))
    before = await all_boxes(vagrant)
    await t.expect_status(call(vagrant), FP, "box is required")
    assert await all_boxes(vagrant) == before


@pytest.mark.parametrize(
    ("call", "allowed"),
    [
        (
            lambda v: v.GetBox(vs.GetBoxRequest(box=sdk.Ref.Box(resource_id="a\x00b"))),
            {"INVALID_ARGUMENT"},
        ),
        (
            lambda v: v.GetBox(
                vs.GetBoxRequest(box=sdk.Ref.Box(name="a\x00b", provider="virtualbox"))
            ),
            {"INVALID_ARGUMENT"},
        ),
        (
            lambda v: v.FindBox(vs.FindBoxRequest(box=sdk.Ref.Box(name="a\x00b"))),
            {"INVALID_ARGUMENT"},
        ),
        (
            lambda v: v.DeleteBox(
                vs.DeleteBoxRequest(box=sdk.Ref.Box(name="a\x00b", provider="virtualbox"))
            ),
            {"INVALID_ARGUMENT"},
        ),
    ],
    ids=["get-by-id", "get-by-key", "find", "delete"],
)
async def test_box_lookups_with_nul_bytes_are_invalid_argument(
    vagrant: vs_grpc.VagrantAsyncStub,
    request: pytest.FixtureRequest,
    backend_url: str,
    call: Callable[[vs_grpc.VagrantAsyncStub], Awaitable[object]],
    allowed: set[str],
) -> None:
    await upsert_box(vagrant, t.box(resource_id="keep", name="ab"))
    before = await all_boxes(vagrant)
    assert await outcome(call(vagrant)) in allowed
    assert await all_boxes(vagrant) == before
