"""Config variables (waystation.v1.Admin ConfigSet/ConfigGet, RunnerConfig) and
GetLogStream (docs/protocols.md section 3; vagrant_server.proto ConfigVar, LogBatch)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import pytest
from grpc import StatusCode, aio

from waystation import testing as t
from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc

FP = StatusCode.FAILED_PRECONDITION
Job = vs.Job
ANY = vs.Ref.Runner(any=vs.Ref.RunnerAny())


# -- helpers ---------------------------------------------------------------------


@dataclass
class Scope:
    basis: vs.Basis
    project: vs.Project
    targets: list[vs.Target]

    @property
    def basis_ref(self) -> sdk.Ref.Basis:
        return sdk.Ref.Basis(resource_id=self.basis.resource_id)

    @property
    def project_ref(self) -> sdk.Ref.Project:
        return sdk.Ref.Project(resource_id=self.project.resource_id)

    def target_ref(self, i: int = 0) -> sdk.Ref.Target:
        return sdk.Ref.Target(resource_id=self.targets[i].resource_id)


async def make_scope(vagrant: vs_grpc.VagrantAsyncStub, targets: int = 1) -> Scope:
    basis = (await vagrant.UpsertBasis(vs.UpsertBasisRequest(basis=t.basis()))).basis
    project = (
        await vagrant.UpsertProject(vs.UpsertProjectRequest(project=t.project(t.basis_ref(basis))))
    ).project
    made = []
    for _ in range(targets):
        resp = await vagrant.UpsertTarget(
            vs.UpsertTargetRequest(project=t.project_ref(project), target=t.target())
        )
        made.append(resp.target)
    return Scope(basis, project, made)


def runner_id(rid: str) -> vs.Ref.Runner:
    return vs.Ref.Runner(id=vs.Ref.RunnerId(id=rid))


def var(name: str, value: str, **scope: Any) -> vs.ConfigVar:
    return vs.ConfigVar(name=name, value=value, **scope)


async def config_set(admin: admin_grpc.AdminAsyncStub, *variables: vs.ConfigVar) -> None:
    await admin.ConfigSet(vs.ConfigSetRequest(variables=variables))


async def config_get(
    admin: admin_grpc.AdminAsyncStub, prefix: str = "", **scope: Any
) -> list[vs.ConfigVar]:
    resp = await admin.ConfigGet(vs.ConfigGetRequest(prefix=prefix, **scope))
    return list(resp.variables)


def pairs(variables: Any) -> list[tuple[str, str]]:
    return [(v.name, v.value) for v in variables]


def runner_vars(config: vs.RunnerConfig) -> list[tuple[str, str, str]]:
    """(name, value, `any` or the runner id) of each variable, in the order sent."""
    out = []
    for v in config.config_vars:
        assert v.WhichOneof("scope") == "runner", v
        which = v.runner.WhichOneof("target")
        out.append((v.name, v.value, "any" if which == "any" else v.runner.id.id.lower()))
    return out


async def all_config(admin: admin_grpc.AdminAsyncStub, scope: Scope) -> list[list[vs.ConfigVar]]:
    """Every variable this module's tests set, per scope: compare before and after."""
    return [
        await config_get(admin, basis=scope.basis_ref),
        await config_get(admin, project=scope.project_ref),
        await config_get(admin, target=scope.target_ref()),
        await config_get(admin, runner=vs.Ref.RunnerId(id="r1")),
        await config_get(admin, runner=vs.Ref.RunnerId(id="nobody")),
    ]


async def still_pending(tasks: Sequence[asyncio.Future[Any]], seconds: float = 1.0) -> None:
    """Nothing arrives for a while (reads are never cancelled: that ends the call)."""
    done, _ = await asyncio.wait(tasks, timeout=seconds)
    assert not done, [d.result() for d in done]


# -- ConfigSet / ConfigGet ---------------------------------------------------------


async def test_config_vars_per_scope(
    admin: admin_grpc.AdminAsyncStub, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    scope = await make_scope(vagrant)
    await config_set(
        admin,
        var("region", "eu", basis=scope.basis_ref),
        var("db_host", "basis-db", basis=scope.basis_ref),
        var("region", "us", project=scope.project_ref),
        var("size", "large", target=scope.target_ref()),
        var("region", "ap", target=scope.target_ref()),
        var("token", "any-token", runner=ANY),
        var("shared", "from-any", runner=ANY),
        var("shared", "from-r1", runner=runner_id("r1")),
    )

    basis_vars = await config_get(admin, basis=scope.basis_ref)
    assert pairs(basis_vars) == [("db_host", "basis-db"), ("region", "eu")]
    assert all(v.WhichOneof("scope") == "basis" for v in basis_vars)
    assert all(v.basis.resource_id == scope.basis.resource_id for v in basis_vars)
    project_vars = await config_get(admin, project=scope.project_ref)
    assert pairs(project_vars) == [("region", "us")]
    assert project_vars[0].project.resource_id == scope.project.resource_id
    target_vars = await config_get(admin, target=scope.target_ref())
    assert pairs(target_vars) == [("region", "ap"), ("size", "large")]
    assert all(v.target.resource_id == scope.targets[0].resource_id for v in target_vars)

    # Runners: those for any runner, then the runner's own, which win; by name.
    mine = await config_get(admin, runner=vs.Ref.RunnerId(id="r1"))
    assert pairs(mine) == [("shared", "from-r1"), ("token", "any-token")]
    assert mine[0].runner.id.id.lower() == "r1"
    assert mine[1].runner.WhichOneof("target") == "any"
    other = await config_get(admin, runner=vs.Ref.RunnerId(id="r2"))
    assert pairs(other) == [("shared", "from-any"), ("token", "any-token")]

    # Scopes do not leak into one another.
    elsewhere = await make_scope(vagrant)
    assert await config_get(admin, basis=elsewhere.basis_ref) == []
    assert await config_get(admin, project=elsewhere.project_ref) == []
    assert await config_get(admin, target=elsewhere.target_ref()) == []

    # Setting again replaces; an empty value deletes; deleting nothing is fine.
    await config_set(
        admin,
        var("region", "", basis=scope.basis_ref),
        var("db_host", "new-db", basis=scope.basis_ref),
        var("never-set", "", basis=scope.basis_ref),
        var("shared", "", runner=runner_id("r1")),
    )
    assert pairs(await config_get(admin, basis=scope.basis_ref)) == [("db_host", "new-db")]
    assert pairs(await config_get(admin, project=scope.project_ref)) == [("region", "us")]
    mine = await config_get(admin, runner=vs.Ref.RunnerId(id="r1"))
    assert pairs(mine) == [("shared", "from-any"), ("token", "any-token")]


async def test_config_get_prefix_filter(
    admin: admin_grpc.AdminAsyncStub, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    scope = await make_scope(vagrant)
    names = ["app", "db_host", "db_port", "dbXhost", "db%x", "db"]
    await config_set(admin, *(var(n, f"v-{n}", basis=scope.basis_ref) for n in names))
    await config_set(
        admin,
        var("db_user", "any", runner=ANY),
        var("db_pass", "mine", runner=runner_id("r1")),
        var("log_level", "debug", runner=ANY),
    )

    def got(variables: list[vs.ConfigVar]) -> list[str]:
        return [v.name for v in variables]

    assert got(await config_get(admin, basis=scope.basis_ref)) == sorted(names)
    # `_` and `%` are literal characters, not patterns.
    assert got(await config_get(admin, "db_", basis=scope.basis_ref)) == ["db_host", "db_port"]
    assert got(await config_get(admin, "db%", basis=scope.basis_ref)) == ["db%x"]
    assert got(await config_get(admin, "db", basis=scope.basis_ref)) == [
        "db",
        "db%x",
        "dbXhost",
        "db_host",
        "db_port",
    ]
    assert got(await config_get(admin, "nothing", basis=scope.basis_ref)) == []
    runner = vs.Ref.RunnerId(id="r1")
    assert got(await config_get(admin, "db_", runner=runner)) == ["db_pass", "db_user"]
    assert got(await config_get(admin, "log", runner=runner)) == ["log_level"]
    # The escape character of the LIKE the store may use is literal too.
    await config_set(
        admin, *(var(n, "x", project=scope.project_ref) for n in ("a/b", "a//c", "ab", "a"))
    )
    assert got(await config_get(admin, "a/", project=scope.project_ref)) == ["a//c", "a/b"]
    assert got(await config_get(admin, "a//", project=scope.project_ref)) == ["a//c"]


async def test_config_prefix_is_case_sensitive(
    admin: admin_grpc.AdminAsyncStub,
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    scope = await make_scope(vagrant)
    # Names are case-sensitive: these are three variables.
    names = ["DB_HOST", "Db_mode", "db_host"]
    await config_set(admin, *(var(n, n.lower(), basis=scope.basis_ref) for n in names))
    await config_set(admin, *(var(n, n.lower(), runner=ANY) for n in names))
    assert [v.name for v in await config_get(admin, basis=scope.basis_ref)] == sorted(names)
    runner = vs.Ref.RunnerId(id="r1")
    assert [v.name for v in await config_get(admin, runner=runner)] == sorted(names)

    assert pairs(await config_get(admin, "db", basis=scope.basis_ref)) == [("db_host", "db_host")]
    assert pairs(await config_get(admin, "DB", basis=scope.basis_ref)) == [("DB_HOST", "db_host")]
    assert [v.name for v in await config_get(admin, "db", runner=runner)] == ["db_host"]


@pytest.mark.parametrize(
    "bad",
    [
        pytest.param(vs.ConfigVar(name="orphan", value="x"), id="no-scope"),
        pytest.param(var("r", "x", runner=vs.Ref.Runner()), id="runner-neither-any-nor-id"),
        pytest.param(var("b", "x", basis=sdk.Ref.Basis(name="by-name")), id="basis-no-id"),
        pytest.param(var("p", "x", project=sdk.Ref.Project()), id="project-no-id"),
        pytest.param(var("t", "x", target=sdk.Ref.Target(name="web")), id="target-no-id"),
    ],
)
async def test_config_set_without_a_scope_is_refused_and_changes_nothing(
    admin: admin_grpc.AdminAsyncStub, vagrant: vs_grpc.VagrantAsyncStub, bad: vs.ConfigVar
) -> None:
    scope = await make_scope(vagrant)
    await config_set(admin, var("keep", "old", basis=scope.basis_ref))
    before = await all_config(admin, scope)
    await t.expect_status(
        admin.ConfigSet(
            vs.ConfigSetRequest(
                variables=[
                    var("keep", "new", basis=scope.basis_ref),
                    var("added", "x", basis=scope.basis_ref),
                    bad,
                ]
            )
        ),
        FP,
    )
    assert await all_config(admin, scope) == before


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(vs.ConfigGetRequest(), id="no-scope"),
        pytest.param(vs.ConfigGetRequest(prefix="db"), id="prefix-only"),
        pytest.param(vs.ConfigGetRequest(basis=sdk.Ref.Basis(name="b")), id="basis-no-id"),
        pytest.param(vs.ConfigGetRequest(project=sdk.Ref.Project()), id="project-no-id"),
        pytest.param(vs.ConfigGetRequest(target=sdk.Ref.Target(name="t")), id="target-no-id"),
    ],
)
async def test_config_get_without_a_scope_is_refused(
    admin: admin_grpc.AdminAsyncStub, request_: vs.ConfigGetRequest
) -> None:
    await t.expect_status(admin.ConfigGet(request_), FP)


@pytest.mark.parametrize(
    "name",
    [
        pytest.param("bad\x00name", id="nul"),
        pytest.param("n" * 10_240, id="10KB"),
    ],
)
async def test_bad_names_are_rejected_and_change_nothing(
    admin: admin_grpc.AdminAsyncStub,
    vagrant: vs_grpc.VagrantAsyncStub,
    channel: aio.Channel,
    name: str,
) -> None:
    scope = await make_scope(vagrant)
    await config_set(
        admin,
        var("keep", "old", basis=scope.basis_ref),
        var("keep", "old", runner=ANY),
    )
    fake = t.FakeRunner(channel, "r1")
    await fake.register()
    try:
        pending = asyncio.ensure_future(fake.next_config())
        before = await all_config(admin, scope)
        for bad in (
            var(name, "x", basis=scope.basis_ref),
            var(name, "x", target=scope.target_ref()),
            var(name, "x", runner=ANY),
        ):
            # Good changes in the same request are not applied either.
            await t.expect_status(
                admin.ConfigSet(
                    vs.ConfigSetRequest(
                        variables=[
                            var("keep", "new", basis=scope.basis_ref),
                            var("keep", "new", runner=ANY),
                            var("added", "x", runner=runner_id("r1")),
                            bad,
                        ]
                    )
                ),
                StatusCode.INVALID_ARGUMENT,
            )
        assert await all_config(admin, scope) == before
        await still_pending([pending])  # runners heard of no change
        await config_set(admin, var("later", "1", runner=ANY))
        config = await asyncio.wait_for(pending, 30)
        assert runner_vars(config) == [("keep", "old", "any"), ("later", "1", "any")]
    finally:
        await fake.close()


# -- RunnerConfig ------------------------------------------------------------------


async def test_runner_config_stream_sends_the_set_now_and_after_runner_changes(
    admin: admin_grpc.AdminAsyncStub, vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    scope = await make_scope(vagrant)
    await config_set(
        admin,
        var("z", "any-z", runner=ANY),
        var("shared", "from-any", runner=ANY),
        var("a", "any-a", runner=ANY),
        var("shared", "from-r1", runner=runner_id("r1")),
        var("m", "r1-m", runner=runner_id("R1")),  # runner ids ignore case
        var("q", "r2-q", runner=runner_id("r2")),
        var("not-for-runners", "x", basis=scope.basis_ref),
    )
    r1, r2 = t.FakeRunner(channel, "r1"), t.FakeRunner(channel, "r2")
    try:
        first = await r1.register()
        assert runner_vars(first) == [
            ("a", "any-a", "any"),
            ("m", "r1-m", "r1"),
            ("shared", "from-r1", "r1"),
            ("z", "any-z", "any"),
        ]
        assert runner_vars(await r2.register()) == [
            ("a", "any-a", "any"),
            ("q", "r2-q", "r2"),
            ("shared", "from-any", "any"),
            ("z", "any-z", "any"),
        ]

        async def both() -> tuple[list[tuple[str, str, str]], list[tuple[str, str, str]]]:
            c1, c2 = await asyncio.wait_for(asyncio.gather(r1.next_config(), r2.next_config()), 30)
            return runner_vars(c1), runner_vars(c2)

        # Any runner-scoped change: every connected runner gets its full set again.
        await config_set(admin, var("b", "any-b", runner=ANY))
        got1, got2 = await both()
        assert got1 == [
            ("a", "any-a", "any"),
            ("b", "any-b", "any"),
            ("m", "r1-m", "r1"),
            ("shared", "from-r1", "r1"),
            ("z", "any-z", "any"),
        ]
        assert got2 == [
            ("a", "any-a", "any"),
            ("b", "any-b", "any"),
            ("q", "r2-q", "r2"),
            ("shared", "from-any", "any"),
            ("z", "any-z", "any"),
        ]
        # Even one aimed at another runner (r1's set is simply the same again).
        await config_set(admin, var("shared", "from-r2", runner=runner_id("r2")))
        again1, got2 = await both()
        assert again1 == got1
        assert ("shared", "from-r2", "r2") in got2
        # Deleting is a change too.
        await config_set(admin, var("a", "", runner=ANY), var("m", "", runner=runner_id("r1")))
        got1, got2 = await both()
        assert got1 == [
            ("b", "any-b", "any"),
            ("shared", "from-r1", "r1"),
            ("z", "any-z", "any"),
        ]
        assert [n for n, _, _ in got2] == ["b", "q", "shared", "z"]

        # Changes to other scopes send nothing...
        pending = [asyncio.ensure_future(r.next_config()) for r in (r1, r2)]
        await config_set(
            admin,
            var("region", "eu", basis=scope.basis_ref),
            var("region", "us", project=scope.project_ref),
            var("region", "ap", target=scope.target_ref()),
            var("not-for-runners", "", basis=scope.basis_ref),
        )
        await still_pending(pending)
        # ...and the next runner change is the next message, on streams still open.
        await config_set(admin, var("c", "any-c", runner=ANY))
        c1, c2 = await asyncio.wait_for(asyncio.gather(*pending), 30)
        assert [n for n, _, _ in runner_vars(c1)] == ["b", "c", "shared", "z"]
        assert [n for n, _, _ in runner_vars(c2)] == ["b", "c", "q", "shared", "z"]

        # A runner that connects later gets the current set first.
        r3 = t.FakeRunner(channel, "r3")
        try:
            late = runner_vars(await r3.register())
            assert late == [
                ("b", "any-b", "any"),
                ("c", "any-c", "any"),
                ("shared", "from-any", "any"),
                ("z", "any-z", "any"),
            ]
        finally:
            await r3.close()
    finally:
        await r1.close()
        await r2.close()


# -- GetLogStream ------------------------------------------------------------------


def chunks(lines: list[str], size: int = 10) -> Iterator[list[str]]:
    for i in range(0, len(lines), size):
        yield lines[i : i + size]


async def run_job(
    vagrant: vs_grpc.VagrantAsyncStub, fake: t.FakeRunner, job: vs.Job, lines: list[str]
) -> str:
    """Queue a job, run it on `fake` writing `lines` in batches, and wait for SUCCESS."""
    job_id = (await vagrant.QueueJob(vs.QueueJobRequest(job=job))).job_id
    stream = fake.job_stream()
    assert (await stream.take()).id == job_id
    for part in chunks(lines):
        await stream.output(*part)
    await stream.complete()
    await t.wait_for_state(vagrant, job_id, Job.SUCCESS)
    return job_id


class LogReader:
    """A GetLogStream call, read line by line."""

    def __init__(self, vagrant: vs_grpc.VagrantAsyncStub, request: vs.GetLogStreamRequest) -> None:
        self.call: Any = vagrant.GetLogStream(request)
        self.batches: list[vs.LogBatch] = []
        self.buffered: list[str] = []

    async def lines(self, count: int, timeout: float = 30) -> list[str]:
        """The next `count` lines; more in the last batch read fail the test."""

        async def fill() -> None:
            while len(self.buffered) < count:
                batch = await self.call.read()
                assert batch is not aio.EOF, "the log stream ended"  # type: ignore[attr-defined]
                assert isinstance(batch, vs.LogBatch)
                self.batches.append(batch)
                self.buffered += [entry.line for entry in batch.lines]

        await asyncio.wait_for(fill(), timeout)
        got, self.buffered = self.buffered, []
        assert len(got) == count, f"expected {count} lines, got {len(got)}: {got}"
        return got

    def cancel(self) -> None:
        self.call.cancel()


async def test_log_stream_backlog_then_live_lines_per_scope(
    vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    scope = await make_scope(vagrant, targets=2)
    target, other_target = scope.target_ref(0), scope.target_ref(1)
    fake = t.FakeRunner(channel, "logger")
    await fake.register()
    readers: list[LogReader] = []
    try:
        one = [f"one-{i}" for i in range(60)]
        proj = [f"proj-{i}" for i in range(5)]
        two = [f"two-{i}" for i in range(10)]
        await run_job(vagrant, fake, t.command_job(target), one)
        await run_job(vagrant, fake, t.noop_job(project=scope.project_ref), proj)
        await run_job(vagrant, fake, t.noop_job(target=target), two)
        on_target = one + two
        on_project = one + proj + two

        cases: list[tuple[dict[str, Any], list[str]]] = [
            ({"target": target, "limit_backlog": 0}, on_target[-50:]),  # 0 means 50
            ({"target": target, "limit_backlog": 15}, on_target[-15:]),  # across two jobs
            ({"target": target, "limit_backlog": 3}, on_target[-3:]),
            ({"target": target, "limit_backlog": -1}, on_target),  # negative: all
            ({"target": target, "limit_backlog": 1000}, on_target),
            ({"project": scope.project_ref, "limit_backlog": 0}, on_project[-50:]),
            ({"project": scope.project_ref, "limit_backlog": -5}, on_project),
            ({"basis": scope.basis_ref, "limit_backlog": 7}, on_project[-7:]),
            ({"basis": scope.basis_ref, "limit_backlog": -1}, on_project),
        ]
        for request, expected in cases:
            reader = LogReader(vagrant, vs.GetLogStreamRequest(**request))
            readers.append(reader)
            assert await reader.lines(len(expected)) == expected, request

        # Another target's job: its project and basis followers see it, the
        # target's do not (their next lines are the live ones below).
        await run_job(vagrant, fake, t.command_job(other_target), ["elsewhere"])
        for reader, (request, _) in zip(readers, cases, strict=True):
            if "target" not in request:
                assert await reader.lines(1) == ["elsewhere"], request

        # Live: lines arrive while the job writes them, before it completes.
        live_id = (await vagrant.QueueJob(vs.QueueJobRequest(job=t.command_job(target)))).job_id
        stream = fake.job_stream()
        assert (await stream.take()).id == live_id
        await stream.output("live-0", "live-1")
        for reader, (request, _) in zip(readers, cases, strict=True):
            assert await reader.lines(2) == ["live-0", "live-1"], request
        assert (await vagrant.GetJob(vs.GetJobRequest(job_id=live_id))).state == Job.RUNNING
        await stream.output("live-2")
        await stream.complete()
        for reader, (request, _) in zip(readers, cases, strict=True):
            assert await reader.lines(1) == ["live-2"], request
    finally:
        for reader in readers:
            reader.cancel()
        await fake.close()


async def test_log_stream_without_lines_is_unavailable_until_there_are_some(
    vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    scope = await make_scope(vagrant)
    target = scope.target_ref()
    requests = [
        vs.GetLogStreamRequest(target=target),
        vs.GetLogStreamRequest(project=scope.project_ref, limit_backlog=-1),
        vs.GetLogStreamRequest(basis=scope.basis_ref, limit_backlog=10),
    ]

    async def all_unavailable() -> None:
        for request in requests:
            call = vagrant.GetLogStream(request)
            await asyncio.wait_for(t.expect_status(call.read(), StatusCode.UNAVAILABLE), 10)

    await all_unavailable()  # no job at all
    fake = t.FakeRunner(channel, "r")
    await fake.register()
    try:
        # A job that has not written anything yet: still no lines.
        job_id = (await vagrant.QueueJob(vs.QueueJobRequest(job=t.command_job(target)))).job_id
        stream = fake.job_stream()
        assert (await stream.take()).id == job_id
        await t.wait_for_state(vagrant, job_id, Job.RUNNING)
        await all_unavailable()
        # The client retries once there is output.
        await stream.output("hello")
        await stream.complete()
        await t.wait_for_state(vagrant, job_id, Job.SUCCESS)
        for request in requests:
            reader = LogReader(vagrant, request)
            try:
                assert await reader.lines(1) == ["hello"]
            finally:
                reader.cancel()
    finally:
        await fake.close()


@pytest.mark.parametrize(
    "request_",
    [
        pytest.param(vs.GetLogStreamRequest(target=sdk.Ref.Target(resource_id="01GHOST")), id="t"),
        pytest.param(
            vs.GetLogStreamRequest(project=sdk.Ref.Project(resource_id="01GHOST")), id="p"
        ),
        pytest.param(vs.GetLogStreamRequest(basis=sdk.Ref.Basis(resource_id="01GHOST")), id="b"),
        pytest.param(vs.GetLogStreamRequest(basis=sdk.Ref.Basis(name="nope")), id="b-name"),
    ],
)
async def test_log_stream_of_an_unknown_scope_is_not_found(
    vagrant: vs_grpc.VagrantAsyncStub, request_: vs.GetLogStreamRequest
) -> None:
    call = vagrant.GetLogStream(request_)
    await asyncio.wait_for(t.expect_status(call.read(), StatusCode.NOT_FOUND), 10)


async def test_log_stream_without_a_scope_is_refused(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    call = vagrant.GetLogStream(vs.GetLogStreamRequest(limit_backlog=5))
    await asyncio.wait_for(t.expect_status(call.read(), FP), 10)
