"""The runner agent in-process against a real server over gRPC: operations (Noop,
Init, Docs, Auth, Validate, Command), live output, cancel, the local machine
provider, git data sources, concurrency, burst mode, draining, heartbeats and
reconnecting to a server that starts late or crashes (docs/protocols.md, sections 2-3).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.rpc import code_pb2
from grpc import aio

from waystation import testing as t
from waystation.client import reconnect_pause
from waystation.core.timeouts import Timeouts, now_us
from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc
from waystation.runner import builtin
from waystation.runner.agent import Agent, AgentSettings
from waystation.runner.plugins import (
    Action,
    AuthResult,
    Command,
    CommandContext,
    Documentation,
    Flag,
    Hook,
    Plugin,
)
from waystation.server.app import RunningServer
from waystation.store import Store

Job = vs.Job
Event = vs.GetJobStreamResponse.Terminal.Event
ANY = vs.Ref.Runner(any=vs.Ref.RunnerAny())
FINAL = (Job.SUCCESS, Job.ERROR)
GIT = shutil.which("git") or "git"


# -- a test plugin -----------------------------------------------------------------


@dataclass
class AuthProbe:
    """An auth function that answers `ok` and records each check_only it was given."""

    ok: bool = True
    calls: list[bool] = field(default_factory=list)

    async def __call__(self, check_only: bool) -> AuthResult:
        self.calls.append(check_only)
        return AuthResult(supported=True, ok=self.ok, message="" if self.ok else "token expired")


async def hello(ctx: CommandContext) -> int:
    ctx.ui.line(f"hello, {ctx.flags.get('name', 'world')} {' '.join(ctx.args)}".strip())
    return 0


async def crash(ctx: CommandContext) -> int:
    raise RuntimeError("boom")


def make_plugin(probe: AuthProbe | None = None) -> Plugin:
    return Plugin(
        name="testplug",
        commands=(
            Command("hello", "Say hello", hello, flags=(Flag("name", "Who to greet"),)),
            Command("crash", "Raise", crash),
        ),
        actions=(Action("provision"),),
        hooks=(Hook("up", "provision", after=True), Hook("halt", "snapshot")),
        docs=Documentation("A plugin for tests.", example="run hello", fields={"token": "API"}),
        component=vs.Component.PROVIDER,
        auth=probe,
    )


# -- helpers -----------------------------------------------------------------------


@contextlib.asynccontextmanager
async def running_agent(
    address: str,
    data_dir: Path,
    *,
    plugins: list[Plugin] | None = None,
    registered: bool = True,
    **settings: Any,
) -> AsyncIterator[Agent]:
    """The real Agent as a task; stopped (drained) and awaited on exit."""
    settings.setdefault("runner_id", "runner-1")
    settings.setdefault("heartbeat", 0.2)
    settings.setdefault("backoff_max", 1.0)
    config = AgentSettings(address=address, data_dir=data_dir, **settings)
    agent = Agent(config) if plugins is None else Agent(config, plugins=plugins)
    task = asyncio.ensure_future(agent.run())
    body_failed = False
    try:
        if registered:
            await until_registered(agent, task)
        yield agent
    except BaseException:
        body_failed = True
        raise
    finally:
        # Stop once every worker waits for a job (a stop that lands while a worker sends
        # its next request is missed: test_a_stop_during_the_next_request_...).
        await until_idle(agent, task)
        agent.stop()
        done, _ = await asyncio.wait({task}, timeout=45)
        if not done:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if not body_failed:
                raise AssertionError("the agent did not stop within 45s")
        elif not body_failed:
            task.result()  # the agent's own failure, if any


async def until_idle(agent: Agent, task: asyncio.Future[None], timeout: float = 10) -> None:
    """Until each worker waits for an assignment (or the agent ended, or time is up)."""
    deadline = time.monotonic() + timeout
    while len(agent._waiting) < agent.settings.concurrency and not task.done():
        if time.monotonic() > deadline:
            return  # a job still runs: stop() lets it finish
        await asyncio.sleep(0.02)


async def until_registered(agent: Agent, task: asyncio.Future[None], timeout: float = 30) -> None:
    registered: asyncio.Future[Any] = asyncio.ensure_future(agent.registered.wait())
    done, _ = await asyncio.wait(
        {registered, task}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
    )
    registered.cancel()
    if task in done:
        task.result()
        raise AssertionError("the agent stopped before registering")
    assert registered in done, "the agent did not register"


def plugins(probe: AuthProbe | None = None) -> list[Plugin]:
    return [builtin.plugin, make_plugin(probe)]


async def queue(vagrant: vs_grpc.VagrantAsyncStub, job: vs.Job) -> str:
    return (await vagrant.QueueJob(vs.QueueJobRequest(job=job))).job_id


async def finished(vagrant: vs_grpc.VagrantAsyncStub, job_id: str, timeout: float = 60) -> vs.Job:
    """The job once it has ended, whichever way."""
    deadline = time.monotonic() + timeout
    while True:
        job = await vagrant.GetJob(vs.GetJobRequest(job_id=job_id))
        if job.state in FINAL:
            return job
        assert time.monotonic() < deadline, f"job {job_id} still {Job.State.Name(job.state)}"
        await asyncio.sleep(0.05)


async def run(vagrant: vs_grpc.VagrantAsyncStub, job: vs.Job, timeout: float = 60) -> vs.Job:
    return await finished(vagrant, await queue(vagrant, job), timeout)


def succeeded(job: vs.Job) -> vs.Job:
    assert job.state == Job.SUCCESS, f"{Job.State.Name(job.state)}: {job.error}"
    return job


def failed(job: vs.Job, code: int, *fragments: str) -> vs.Job:
    assert job.state == Job.ERROR, f"{Job.State.Name(job.state)}: {job.result}"
    assert job.error.code == code, f"code {job.error.code}: {job.error.message}"
    for fragment in fragments:
        assert fragment in job.error.message, f"{fragment!r} not in {job.error.message!r}"
    return job


def command(name: str, *args: str, scope: dict[str, Any] | None = None, **fields: Any) -> vs.Job:
    """A Command job for any runner; `scope` is the job's scope (none: never blocked)."""
    flags = fields.pop("flags", [])
    op = vs.Job.CommandOp(
        command=name, cli_args=sdk.Command.Arguments(args=list(args), flags=flags)
    )
    if "vagrantfile" in fields:
        op.vagrantfile.CopyFrom(fields.pop("vagrantfile"))
    return vs.Job(target_runner=ANY, command=op, **(scope or {}), **fields)


def exec_job(script: str, **fields: Any) -> vs.Job:
    return command("exec", script, **fields)


def raws(events: list[vs.GetJobStreamResponse]) -> list[Event.Raw]:
    return [
        e.raw
        for event in events
        if event.WhichOneof("event") == "terminal"
        for e in event.terminal.events
        if e.WhichOneof("event") == "raw"
    ]


def stdout(events: list[vs.GetJobStreamResponse]) -> str:
    return b"".join(r.data for r in raws(events) if not r.stderr).decode()


def tables(events: list[vs.GetJobStreamResponse]) -> list[list[list[str]]]:
    return [
        [[entry.value for entry in row.entries] for row in e.table.rows]
        for event in events
        if event.WhichOneof("event") == "terminal"
        for e in event.terminal.events
        if e.WhichOneof("event") == "table"
    ]


async def first_output(vagrant: vs_grpc.VagrantAsyncStub, job_id: str, timeout: float = 30) -> str:
    """The first raw stdout the job writes, read live from its stream."""
    call = vagrant.GetJobStream(vs.GetJobStreamRequest(job_id=job_id))
    try:
        async with asyncio.timeout(timeout):
            async for event in call:
                if event.WhichOneof("event") == "complete":
                    break
                text = stdout([event])
                if text:
                    return text
    finally:
        call.cancel()
    raise AssertionError(f"job {job_id} wrote nothing to stdout")


def group_alive(pgid: int) -> bool:
    """Whether any live (non-zombie) process is in the process group."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, _ppid, pgrp = text[text.rindex(")") + 2 :].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            return True
    return False


async def until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout}s: {what}"
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def busy_loop(block: float = 0.02) -> AsyncIterator[None]:
    """Keep the event loop busy (as a runner with much to do is): each turn takes
    `block` seconds, so several ready callbacks run in one turn."""
    loop = asyncio.get_running_loop()
    handle: list[asyncio.Handle] = []

    def hog() -> None:
        time.sleep(block)
        handle[:] = [loop.call_soon(hog)]

    handle.append(loop.call_soon(hog))
    try:
        yield
    finally:
        handle[0].cancel()


async def group_gone(pgid: int, timeout: float) -> None:
    await until(lambda: not group_alive(pgid), timeout, f"process group {pgid} exited")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def stub_for(address: str) -> AsyncIterator[vs_grpc.VagrantAsyncStub]:
    async with aio.insecure_channel(address) as ch:
        yield vs_grpc.VagrantStub(ch)


@dataclass
class Machine:
    basis: vs.Basis
    project: vs.Project
    target: vs.Target

    @property
    def ref(self) -> sdk.Ref.Target:
        return sdk.Ref.Target(resource_id=self.target.resource_id)


async def make_target(vagrant: vs_grpc.VagrantAsyncStub) -> Machine:
    basis = (await vagrant.UpsertBasis(vs.UpsertBasisRequest(basis=t.basis()))).basis
    project = t.project(t.basis_ref(basis))
    project = (await vagrant.UpsertProject(vs.UpsertProjectRequest(project=project))).project
    target = t.target("web")
    request = vs.UpsertTargetRequest(project=t.project_ref(project), target=target)
    return Machine(basis, project, (await vagrant.UpsertTarget(request)).target)


async def new_basis(vagrant: vs_grpc.VagrantAsyncStub) -> vs.Basis:
    return (await vagrant.UpsertBasis(vs.UpsertBasisRequest(basis=t.basis()))).basis


# -- fixtures ----------------------------------------------------------------------


@pytest.fixture
def timeouts(request: pytest.FixtureRequest) -> Timeouts:
    """conftest's default, or a test's own through indirect parametrization."""
    chosen: Timeouts = getattr(request, "param", Timeouts(poll=0.25))
    return chosen


@pytest.fixture
def probe() -> AuthProbe:
    return AuthProbe()


@pytest.fixture
def runner_dir(tmp_path: Path) -> Path:
    return tmp_path / "runner"


@pytest.fixture
async def agent(
    server: RunningServer, token: str, runner_dir: Path, probe: AuthProbe
) -> AsyncIterator[Agent]:
    async with running_agent(server.address, runner_dir, token=token, plugins=plugins(probe)) as a:
        yield a


# -- Noop, Init, Docs --------------------------------------------------------------


async def test_noop_succeeds_with_the_entry_point_plugins(
    server: RunningServer, token: str, vagrant: vs_grpc.VagrantAsyncStub, runner_dir: Path
) -> None:
    async with running_agent(
        server.address, runner_dir, token=token, runner_id="Noop-Runner"
    ) as agent:
        assert [p.name for p in agent.plugins] == ["builtin"]
        job = succeeded(await run(vagrant, t.noop_job()))
        assert job.assigned_runner.id.lower() == "noop-runner"
        assert job.HasField("ack_time") and job.HasField("complete_time")
        init = succeeded(await run(vagrant, vs.Job(target_runner=ANY, init=vs.Job.InitOp())))
        assert "exec" in [c.name for c in init.result.init.commands]


async def test_init_lists_commands_flags_actions_and_hooks(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    job = succeeded(await run(vagrant, vs.Job(target_runner=ANY, init=vs.Job.InitOp())))
    init = job.result.init
    commands = {c.name: c for c in init.commands}
    assert list(commands) == ["exec", "up", "halt", "destroy", "status", "hello", "crash"]
    assert commands["up"].synopsis == "Start the target's machine"
    assert commands["exec"].primary and "exec COMMAND" in commands["exec"].help
    (force,) = commands["destroy"].flags
    assert (force.long_name, force.short_name) == ("force", "f")
    assert force.type == sdk.Command.Flag.BOOL
    assert force.description == "Do not ask for confirmation"
    assert not commands["up"].flags
    (name,) = commands["hello"].flags
    assert (name.long_name, name.type) == ("name", sdk.Command.Flag.STRING)
    assert [(a.name, a.source) for a in init.actions] == [("provision", "testplug")]
    hooks = [(h.target_action_name, h.action_name, h.location, h.source) for h in init.hooks]
    assert hooks == [
        ("up", "provision", vs.Job.Hook.AFTER, "testplug"),
        ("halt", "snapshot", vs.Job.Hook.BEFORE, "testplug"),
    ]


async def test_docs_returns_each_plugins_documentation(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    job = succeeded(await run(vagrant, vs.Job(target_runner=ANY, docs=vs.Job.DocsOp())))
    docs = {r.component.name: r for r in job.result.docs.results}
    assert list(docs) == ["builtin", "testplug"]
    ours = docs["builtin"]
    assert ours.component.type == vs.Component.COMMAND
    assert ours.docs.description == builtin.plugin.docs.description  # type: ignore[union-attr]
    assert "local" in ours.docs.description
    assert ours.docs.example == "waystation run up --target web"
    theirs = docs["testplug"]
    assert theirs.component.type == vs.Component.PROVIDER
    assert theirs.docs.description == "A plugin for tests."
    assert theirs.docs.fields["token"].name == "token"
    assert theirs.docs.fields["token"].synopsis == "API"


# -- Auth --------------------------------------------------------------------------


def auth_job(check_only: bool, component: str = "") -> vs.Job:
    op = vs.Job.AuthOp(check_only=check_only)
    if component:
        op.component.CopyFrom(vs.Ref.Component(type=vs.Component.PROVIDER, name=component))
    return vs.Job(target_runner=ANY, auth=op)


@pytest.mark.parametrize("ok", [True, False], ids=["ok", "refused"])
@pytest.mark.parametrize("check_only", [True, False], ids=["check", "auth"])
async def test_auth_reports_what_the_plugin_answers(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub, probe: AuthProbe, ok: bool, check_only: bool
) -> None:
    probe.ok = ok
    job = succeeded(await run(vagrant, auth_job(check_only)))
    results = {r.component.name: r for r in job.result.auth.results}
    assert list(results) == ["builtin", "testplug"]
    assert not results["builtin"].auth_supported
    assert not results["builtin"].auth_completed
    entry = results["testplug"]
    assert entry.component.type == vs.Component.PROVIDER
    assert entry.auth_supported
    assert probe.calls == [check_only]
    if check_only:
        assert entry.check_result is ok and not entry.auth_completed
        assert not entry.HasField("auth_error")
        error = entry.check_error
    else:
        assert entry.auth_completed is ok
        assert not entry.HasField("check_error")
        error = entry.auth_error
    if ok:
        assert error.code == 0 and not error.message
    else:
        assert (error.code, error.message) == (code_pb2.UNAUTHENTICATED, "token expired")


@pytest.mark.parametrize("name", ["testplug", "builtin"])
async def test_auth_component_filters_the_results(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub, probe: AuthProbe, name: str
) -> None:
    job = succeeded(await run(vagrant, auth_job(True, component=name)))
    assert [r.component.name for r in job.result.auth.results] == [name]
    assert probe.calls == ([True] if name == "testplug" else [])


async def test_auth_check_result_is_true_for_a_component_without_auth(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    job = succeeded(await run(vagrant, auth_job(True, component="builtin")))
    (entry,) = job.result.auth.results
    assert not entry.auth_supported
    assert entry.check_result


async def test_auth_for_an_unknown_component_fails(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    job = await run(vagrant, auth_job(True, component="nosuchplugin"))
    assert job.state == Job.ERROR
    assert "nosuchplugin" in job.error.message


# -- Validate ----------------------------------------------------------------------

VALID_JSON = b'{\n  "vm": {"box": "hashicorp/bionic64"},\n  "ssh": {"port": 2222}\n}\n'
BAD_JSON = b'{\n  "vm": {\n    "box": "hashicorp/bionic64",\n  }\n}\n'  # trailing comma
VALID_HCL = b'vm {\n  box = "hashicorp/bionic64"\n}\n'
BAD_HCL = b"vm {\n  box = \n"


@pytest.mark.parametrize(
    ("files", "ok", "fragments"),
    [
        pytest.param({"Vagrantfile.json": VALID_JSON}, True, [], id="json"),
        pytest.param({"Vagrantfile.hcl": VALID_HCL}, True, [], id="hcl"),
        pytest.param(
            {"Vagrantfile.json": BAD_JSON},
            False,
            ["Vagrantfile.json", "invalid JSON", "line 4, column 3"],
            id="bad-json",
        ),
        pytest.param(
            {"Vagrantfile.json": b"[1, 2]"}, False, ["top level must be an object"], id="array"
        ),
        pytest.param(
            {"Vagrantfile.hcl": BAD_HCL}, False, ["Vagrantfile.hcl", "invalid HCL"], id="bad-hcl"
        ),
        pytest.param(
            {"Vagrantfile.json": b"\xff\xfe{}"}, False, ["not UTF-8 (byte 0)"], id="not-utf8"
        ),
        pytest.param(
            {"Vagrantfile.json": VALID_JSON, "Vagrantfile.hcl": BAD_HCL},
            True,
            [],
            id="json-first",
        ),
    ],
)
async def test_validate_reads_the_scopes_local_data_dir(
    agent: Agent,
    vagrant: vs_grpc.VagrantAsyncStub,
    runner_dir: Path,
    files: dict[str, bytes],
    ok: bool,
    fragments: list[str],
) -> None:
    basis = await new_basis(vagrant)
    scope_dir = runner_dir / "scopes" / "basis" / basis.resource_id
    scope_dir.mkdir(parents=True)
    for name, content in files.items():
        (scope_dir / name).write_bytes(content)
    job = vs.Job(
        target_runner=ANY,
        basis=t.basis_ref(basis),
        data_source=vs.Job.DataSource(local=vs.Job.Local()),
        validate=vs.Job.ValidateOp(),
    )
    job_id = await queue(vagrant, job)
    done = await finished(vagrant, job_id)
    if ok:
        succeeded(done)
        assert done.result.HasField("validate")
        lines = t.terminal_lines(await t.watch(vagrant, job_id))
        assert len(lines) == 1 and "is valid" in lines[0]
        assert lines[0].startswith(next(iter(files)))
    else:
        failed(done, code_pb2.FAILED_PRECONDITION, *fragments)


async def test_validate_without_a_vagrantfile_is_not_found(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    basis = await new_basis(vagrant)
    job = vs.Job(target_runner=ANY, basis=t.basis_ref(basis), validate=vs.Job.ValidateOp())
    failed(await run(vagrant, job), code_pb2.NOT_FOUND, "no Vagrantfile.json or Vagrantfile.hcl")


@pytest.mark.parametrize(
    ("raw", "fmt", "fragments"),
    [
        pytest.param(VALID_JSON, vs.Vagrantfile.JSON, [], id="json"),
        pytest.param(VALID_HCL, vs.Vagrantfile.HCL, [], id="hcl"),
        pytest.param(
            BAD_JSON,
            vs.Vagrantfile.JSON,
            ["project/Vagrantfile", "invalid JSON", "line 4, column 3"],
            id="bad-json",
        ),
        pytest.param(
            BAD_HCL,
            vs.Vagrantfile.HCL,
            ["invalid HCL"],
            id="bad-hcl",
        ),
        pytest.param(
            b"Vagrant.configure('2') do |config|\nend\n",
            vs.Vagrantfile.RUBY,
            ["Ruby Vagrantfiles need Vagrant's Ruby runtime"],
            id="ruby",
        ),
    ],
)
async def test_a_command_job_checks_the_vagrantfile_it_carries(
    agent: Agent,
    vagrant: vs_grpc.VagrantAsyncStub,
    raw: bytes,
    fmt: vs.Vagrantfile.Format.ValueType,
    fragments: list[str],
) -> None:
    vagrantfile = vs.Vagrantfile(
        raw=raw, format=fmt, path=sdk.Args.Path(path="project/Vagrantfile")
    )
    done = await run(vagrant, command("hello", vagrantfile=vagrantfile))
    if not fragments:
        assert succeeded(done).result.run.run_result
    else:
        failed(done, code_pb2.FAILED_PRECONDITION, *fragments)


# -- Command: exec -----------------------------------------------------------------


async def test_exec_output_streams_live(agent: Agent, vagrant: vs_grpc.VagrantAsyncStub) -> None:
    job_id = await queue(vagrant, exec_job("for i in 1 2 3; do echo $i; sleep 0.3; done"))
    await t.wait_for_state(vagrant, job_id, Job.RUNNING)
    seen: list[vs.GetJobStreamResponse] = []
    state_at_first_output: int | None = None
    call = vagrant.GetJobStream(vs.GetJobStreamRequest(job_id=job_id))
    async with asyncio.timeout(60):
        async for event in call:
            seen.append(event)
            if state_at_first_output is None and raws([event]):
                job = await vagrant.GetJob(vs.GetJobRequest(job_id=job_id))
                state_at_first_output = job.state
    assert state_at_first_output == Job.RUNNING  # output arrived while the job ran
    assert stdout(seen) == "1\n2\n3\n"
    assert seen[-1].WhichOneof("event") == "complete"
    assert seen[-1].complete.result.run.exit_code == 0
    succeeded(await finished(vagrant, job_id))


async def test_exec_sends_stdout_and_stderr_as_raw_events(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    job_id = await queue(vagrant, exec_job("echo out; echo err >&2; echo more"))
    done = succeeded(await finished(vagrant, job_id))
    assert done.result.run.run_result and done.result.run.exit_code == 0
    got = raws(await t.watch(vagrant, job_id))
    assert [(r.data, r.stderr) for r in got if r.stderr] == [(b"err\n", True)]
    # Raw output comes in chunks as the pipe delivers it, not line by line.
    assert b"".join(r.data for r in got if not r.stderr) == b"out\nmore\n"


async def test_exec_nonzero_exit_is_a_successful_job_with_the_exit_code(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    done = succeeded(await run(vagrant, exec_job("echo failing; exit 3")))
    result = done.result.run
    assert not result.run_result
    assert result.exit_code == 3
    assert result.run_error.message == "exec exited with 3"


async def test_exec_argv_runs_in_the_scopes_directory(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub, runner_dir: Path
) -> None:
    basis = await new_basis(vagrant)
    scope = {"basis": t.basis_ref(basis)}
    job_id = await queue(vagrant, command("exec", "printf", "%s|%s", "a b", "$HOME", scope=scope))
    succeeded(await finished(vagrant, job_id))
    assert stdout(await t.watch(vagrant, job_id)) == "a b|$HOME"  # argv: no shell
    job_id = await queue(vagrant, command("exec", "pwd", scope=scope))
    succeeded(await finished(vagrant, job_id))
    expected = runner_dir / "scopes" / "basis" / basis.resource_id
    assert Path(stdout(await t.watch(vagrant, job_id)).strip()).resolve() == expected.resolve()


async def test_exec_without_a_command_exits_2(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    job_id = await queue(vagrant, command("exec"))
    done = succeeded(await finished(vagrant, job_id))
    assert done.result.run.exit_code == 2
    assert t.terminal_lines(await t.watch(vagrant, job_id)) == ["exec needs a command to run"]


async def test_config_variables_reach_the_commands_environment(
    server: RunningServer,
    token: str,
    vagrant: vs_grpc.VagrantAsyncStub,
    admin: admin_grpc.AdminAsyncStub,
    runner_dir: Path,
) -> None:
    def var(name: str, value: str, runner: vs.Ref.Runner = ANY) -> vs.ConfigVar:
        return vs.ConfigVar(name=name, value=value, runner=runner)

    mine = vs.Ref.Runner(id=vs.Ref.RunnerId(id="runner-1"))
    other = vs.Ref.Runner(id=vs.Ref.RunnerId(id="someone-else"))
    await admin.ConfigSet(
        vs.ConfigSetRequest(
            variables=[var("WS_GREETING", "hello there"), var("WS_OTHER", "x", other)]
        )
    )
    async with running_agent(server.address, runner_dir, token=token, plugins=plugins()) as agent:
        # Set after the runner registered: it arrives over the open RunnerConfig stream.
        await admin.ConfigSet(vs.ConfigSetRequest(variables=[var("WS_LATE", "late", mine)]))
        await until(lambda: "WS_LATE" in agent.env, 30, "the runner got WS_LATE")
        script = 'echo "$WS_GREETING|$WS_LATE|${WS_OTHER-unset}"'
        job_id = await queue(vagrant, exec_job(script))
        succeeded(await finished(vagrant, job_id))
        assert stdout(await t.watch(vagrant, job_id)) == "hello there|late|unset\n"


async def test_unknown_command_fails_not_found(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    failed(await run(vagrant, command("frobnicate")), code_pb2.NOT_FOUND, "'frobnicate'")


async def test_plugin_command_gets_args_and_string_flags(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    flag = sdk.Command.Arguments.Flag(name="name", string="Ada")
    job_id = await queue(vagrant, command("hello", "and", "friends", flags=[flag]))
    done = succeeded(await finished(vagrant, job_id))
    assert done.result.run.run_result and done.result.run.exit_code == 0
    assert t.terminal_lines(await t.watch(vagrant, job_id)) == ["hello, Ada and friends"]


async def test_a_crashing_plugin_command_fails_the_job_and_the_agent_goes_on(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    failed(await run(vagrant, command("crash")), code_pb2.INTERNAL, "runner error: boom")
    succeeded(await run(vagrant, t.noop_job()))


async def test_exec_streams_a_line_longer_than_64_kib(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    job_id = await queue(vagrant, exec_job("head -c 100000 /dev/zero | tr '\\0' x; echo; echo end"))
    succeeded(await finished(vagrant, job_id))
    assert stdout(await t.watch(vagrant, job_id)) == "x" * 100000 + "\nend\n"


async def test_exec_streams_many_lines_in_order(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    job_id = await queue(vagrant, exec_job("seq 1 3000"))
    succeeded(await finished(vagrant, job_id))
    assert stdout(await t.watch(vagrant, job_id)) == "".join(f"{i}\n" for i in range(1, 3001))


# -- Cancel ------------------------------------------------------------------------


async def test_graceful_cancel_stops_the_command(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    job_id = await queue(vagrant, exec_job("echo $$; sleep 30"))
    pgid = int(await first_output(vagrant, job_id))
    assert group_alive(pgid)
    started = time.monotonic()
    await vagrant.CancelJob(vs.CancelJobRequest(job_id=job_id))
    done = failed(await finished(vagrant, job_id, timeout=25), code_pb2.CANCELLED, "canceled")
    assert time.monotonic() - started < 25  # the sleep did not run its 30 s
    assert done.HasField("cancel_time")
    await group_gone(pgid, 10)
    lines = t.terminal_lines(await t.watch(vagrant, job_id))
    assert "cancelling: stopping the command" in lines
    succeeded(await run(vagrant, t.noop_job()))  # the agent takes the next job


async def test_force_cancel_kills_the_process_group_at_once(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    # The shell and its sleep ignore SIGTERM: a graceful cancel cannot stop them.
    job_id = await queue(vagrant, exec_job("trap '' TERM; echo $$; sleep 30; echo done"))
    pgid = int(await first_output(vagrant, job_id))
    await vagrant.CancelJob(vs.CancelJobRequest(job_id=job_id))
    graceful = time.monotonic()
    await asyncio.sleep(0.5)
    job = await vagrant.GetJob(vs.GetJobRequest(job_id=job_id))
    assert job.state == Job.RUNNING and job.HasField("cancel_time")
    assert group_alive(pgid)
    await vagrant.CancelJob(vs.CancelJobRequest(job_id=job_id))
    job = await vagrant.GetJob(vs.GetJobRequest(job_id=job_id))
    failed(job, code_pb2.CANCELLED, "canceled")  # ended by the server at once
    # Before the graceful path's own SIGKILL (after STOP_GRACE) could have done it.
    limit = builtin.STOP_GRACE - (time.monotonic() - graceful) - 2
    await group_gone(pgid, limit)
    succeeded(await run(vagrant, t.noop_job()))  # the agent takes the next job


@pytest.mark.parametrize("force", [False, True], ids=["graceful", "force"])
async def test_cancel_stops_a_background_child_after_the_shell_exited(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub, force: bool
) -> None:
    for _ in range(2):
        async with busy_loop():
            job_id = await queue(vagrant, exec_job("sleep 30 & echo $$"))
            pgid = int(await first_output(vagrant, job_id))
        try:
            await asyncio.sleep(0.3)  # the shell is gone; its sleep holds stdout open
            for _ in range(2 if force else 1):
                await vagrant.CancelJob(vs.CancelJobRequest(job_id=job_id))
            failed(await finished(vagrant, job_id, timeout=4), code_pb2.CANCELLED, "canceled")
            await group_gone(pgid, 4)
        finally:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, signal.SIGKILL)


async def test_exec_ends_when_the_command_exits_and_stops_what_it_left_running(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    """A child left in the background holds the output open; the job still ends
    with the command (after a short drain), and the child is stopped."""
    started = time.monotonic()
    # The shell outlives its start by a second: the runner is already waiting
    # for it to exit when it does.
    job_id = await queue(vagrant, exec_job("sleep 30 & echo $$; sleep 1"))
    pgid = int(await first_output(vagrant, job_id))
    try:
        done = succeeded(await finished(vagrant, job_id, timeout=25))
        assert time.monotonic() - started < 25  # not the background sleep's 30 s
        assert done.result.run.exit_code == 0
        await group_gone(pgid, 10)
        assert stdout(await t.watch(vagrant, job_id)) == f"{pgid}\n"
    finally:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)


# -- the local machine provider ----------------------------------------------------


def machine_pid(runner_dir: Path, machine: Machine) -> int:
    state = runner_dir / "scopes" / "target" / machine.target.resource_id / "machine.json"
    pid: int = json.loads(state.read_text())["pid"]
    return pid


async def target_state(vagrant: vs_grpc.VagrantAsyncStub, machine: Machine) -> vs.Target:
    request = vs.GetTargetRequest(target=machine.ref)
    return (await vagrant.GetTarget(request)).target


@contextlib.contextmanager
def reaping(pids: list[int]) -> Iterator[None]:
    """Kill every machine a test started, whatever happens to the test."""
    try:
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)


async def test_machine_lifecycle(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub, runner_dir: Path
) -> None:
    machine = await make_target(vagrant)
    scope = {"target": machine.ref}
    data_dir = runner_dir / "scopes" / "target" / machine.target.resource_id
    started: list[int] = []
    with reaping(started):
        job_id = await queue(vagrant, command("up", scope=scope))
        assert succeeded(await finished(vagrant, job_id)).result.run.run_result
        started.append(pid := machine_pid(runner_dir, machine))
        assert group_alive(pid)
        target = await target_state(vagrant, machine)
        assert target.state == vs.Operation.CREATED and target.provider == "local"
        assert target.name == "web"
        lines = t.terminal_lines(await t.watch(vagrant, job_id))
        assert "==> web: state is now created" in lines

        # up on a running machine keeps it
        succeeded(await run(vagrant, command("up", scope=scope)))
        assert machine_pid(runner_dir, machine) == pid

        job_id = await queue(vagrant, command("status", scope=scope))
        succeeded(await finished(vagrant, job_id))
        assert tables(await t.watch(vagrant, job_id)) == [[["web", "running", "local", str(pid)]]]

        succeeded(await run(vagrant, command("halt", scope=scope)))
        assert (await target_state(vagrant, machine)).state == vs.Operation.HALTED
        assert not group_alive(pid)
        assert not (data_dir / "machine.json").exists()
        job_id = await queue(vagrant, command("status", scope=scope))
        succeeded(await finished(vagrant, job_id))
        assert tables(await t.watch(vagrant, job_id)) == [[["web", "halted", "local", ""]]]

        succeeded(await run(vagrant, command("up", scope=scope)))
        started.append(again := machine_pid(runner_dir, machine))
        assert again != pid and group_alive(again)
        assert (await target_state(vagrant, machine)).state == vs.Operation.CREATED

        force = sdk.Command.Arguments.Flag(name="force", bool=True)
        succeeded(await run(vagrant, command("destroy", scope=scope, flags=[force])))
        target = await target_state(vagrant, machine)
        assert target.state == vs.Operation.DESTROYED and target.provider == "local"
        assert not group_alive(again)
        assert not data_dir.exists()


async def test_machine_commands_are_per_target(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub, runner_dir: Path
) -> None:
    one, two = await make_target(vagrant), await make_target(vagrant)
    started: list[int] = []
    with reaping(started):
        for machine in (one, two):
            succeeded(await run(vagrant, command("up", scope={"target": machine.ref})))
            started.append(machine_pid(runner_dir, machine))
        assert started[0] != started[1]
        succeeded(await run(vagrant, command("halt", scope={"target": one.ref})))
        assert not group_alive(started[0]) and group_alive(started[1])
        assert (await target_state(vagrant, one)).state == vs.Operation.HALTED
        assert (await target_state(vagrant, two)).state == vs.Operation.CREATED
        succeeded(await run(vagrant, command("destroy", scope={"target": two.ref})))
        assert not group_alive(started[1])


# -- git data source ---------------------------------------------------------------


@dataclass
class Repo:
    url: str
    main_sha: str


def git(cwd: Path, *args: str) -> str:
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "HOME": str(cwd),
        "GIT_AUTHOR_NAME": "Test",
        "GIT_AUTHOR_EMAIL": "test@example.com",
        "GIT_COMMITTER_NAME": "Test",
        "GIT_COMMITTER_EMAIL": "test@example.com",
        "GIT_CONFIG_NOSYSTEM": "1",
    }
    done = subprocess.run(
        [GIT, *args], cwd=cwd, env=env, check=True, capture_output=True, text=True
    )
    return done.stdout.strip()


@pytest.fixture
def repo(tmp_path: Path) -> Repo:
    """A bare repository: main holds a valid Vagrantfile.json (and sub/Vagrantfile.hcl),
    other-branch an invalid one."""
    work = tmp_path / "src"
    work.mkdir()
    git(work, "init", "--quiet", "--initial-branch", "main")
    (work / "Vagrantfile.json").write_bytes(VALID_JSON)
    (work / "sub").mkdir()
    (work / "sub" / "Vagrantfile.hcl").write_bytes(VALID_HCL)
    git(work, "add", ".")
    git(work, "commit", "--quiet", "-m", "valid")
    main_sha = git(work, "rev-parse", "HEAD")
    git(work, "checkout", "--quiet", "-b", "other-branch")
    (work / "Vagrantfile.json").write_bytes(BAD_JSON)
    git(work, "commit", "--quiet", "-am", "broken")
    git(work, "checkout", "--quiet", "main")
    git(tmp_path, "clone", "--quiet", "--bare", str(work), str(tmp_path / "repo.git"))
    return Repo(f"file://{tmp_path / 'repo.git'}", main_sha)


def git_validate(
    url: str, ref: str = "", path: str = "", overrides: dict[str, str] | None = None
) -> vs.Job:
    return vs.Job(
        target_runner=ANY,
        data_source=vs.Job.DataSource(git=vs.Job.Git(url=url, ref=ref, path=path)),
        data_source_overrides=overrides or {},
        validate=vs.Job.ValidateOp(),
    )


@pytest.mark.parametrize(
    ("ref", "path", "overrides", "file"),
    [
        pytest.param("", "", {}, "Vagrantfile.json", id="default-branch"),
        pytest.param("main", "", {}, "Vagrantfile.json", id="main"),
        pytest.param("other-branch", "", {"ref": "main"}, "Vagrantfile.json", id="override"),
        pytest.param("main", "sub", {}, "Vagrantfile.hcl", id="path"),
    ],
)
async def test_validate_from_git(
    agent: Agent,
    vagrant: vs_grpc.VagrantAsyncStub,
    repo: Repo,
    ref: str,
    path: str,
    overrides: dict[str, str],
    file: str,
) -> None:
    job_id = await queue(vagrant, git_validate(repo.url, ref, path, overrides))
    succeeded(await finished(vagrant, job_id))
    (line,) = t.terminal_lines(await t.watch(vagrant, job_id))
    assert line.startswith(f"{file} is valid")


@pytest.mark.parametrize(
    ("ref", "overrides"),
    [
        pytest.param("main", {"ref": "other-branch"}, id="override"),
        pytest.param("other-branch", {}, id="ref"),
    ],
)
async def test_git_ref_chooses_what_is_validated(
    agent: Agent,
    vagrant: vs_grpc.VagrantAsyncStub,
    repo: Repo,
    ref: str,
    overrides: dict[str, str],
) -> None:
    job = await run(vagrant, git_validate(repo.url, ref, overrides=overrides))
    failed(job, code_pb2.FAILED_PRECONDITION, "invalid JSON at line 4, column 3")


async def test_git_commit_sha_as_ref(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub, repo: Repo
) -> None:
    succeeded(
        await run(vagrant, git_validate(repo.url, "other-branch", overrides={"ref": repo.main_sha}))
    )


@pytest.mark.parametrize(
    ("url_suffix", "ref", "fragments"),
    [
        pytest.param(".missing", "", ["git clone failed"], id="bad-url"),
        pytest.param("", "no-such-branch", ["no-such-branch"], id="bad-ref"),
    ],
)
async def test_git_failures_fail_the_job_with_gits_reason(
    agent: Agent,
    vagrant: vs_grpc.VagrantAsyncStub,
    repo: Repo,
    url_suffix: str,
    ref: str,
    fragments: list[str],
) -> None:
    job = await run(vagrant, git_validate(repo.url + url_suffix, ref))
    failed(job, code_pb2.FAILED_PRECONDITION, *fragments)


async def test_a_bad_git_ref_says_git_checkout_failed(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub, repo: Repo
) -> None:
    job = await run(vagrant, git_validate(repo.url, "no-such-branch"))
    failed(job, code_pb2.FAILED_PRECONDITION, "git checkout failed", "no-such-branch")


async def test_a_bad_git_url_error_names_the_repository(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub, repo: Repo
) -> None:
    job = await run(vagrant, git_validate(repo.url + ".missing"))
    failed(job, code_pb2.FAILED_PRECONDITION, "git clone failed", "repo.git.missing")


async def test_git_path_that_is_not_a_directory_fails(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub, repo: Repo
) -> None:
    job = await run(vagrant, git_validate(repo.url, "main", "nowhere"))
    failed(job, code_pb2.FAILED_PRECONDITION, "git path 'nowhere' is not a directory")


async def test_exec_runs_in_the_git_checkout(
    agent: Agent, vagrant: vs_grpc.VagrantAsyncStub, repo: Repo
) -> None:
    source = vs.Job.DataSource(git=vs.Job.Git(url=repo.url, ref="main", path="sub"))
    job_id = await queue(vagrant, exec_job("cat Vagrantfile.hcl", data_source=source))
    succeeded(await finished(vagrant, job_id))
    assert stdout(await t.watch(vagrant, job_id)) == VALID_HCL.decode()


# -- agent behaviour ---------------------------------------------------------------


def us(stamp: Any) -> int:
    value: int = stamp.ToMicroseconds()
    return value


async def test_concurrency_two_runs_two_jobs_at_once(
    server: RunningServer, token: str, vagrant: vs_grpc.VagrantAsyncStub, runner_dir: Path
) -> None:
    async with running_agent(
        server.address, runner_dir, token=token, plugins=plugins(), concurrency=2
    ):
        ids = [await queue(vagrant, exec_job("sleep 1")) for _ in range(2)]
        jobs = [succeeded(await finished(vagrant, job_id)) for job_id in ids]
    # Both were RUNNING at the same moment: each was acked before the other completed.
    assert max(us(j.ack_time) for j in jobs) < min(us(j.complete_time) for j in jobs)


async def test_concurrency_one_runs_jobs_one_after_the_other(
    server: RunningServer, token: str, vagrant: vs_grpc.VagrantAsyncStub, runner_dir: Path
) -> None:
    async with running_agent(server.address, runner_dir, token=token, plugins=plugins()):
        ids = [await queue(vagrant, exec_job("sleep 0.3")) for _ in range(2)]
        first, second = [succeeded(await finished(vagrant, job_id)) for job_id in ids]
    assert us(first.complete_time) <= us(second.ack_time)


async def test_by_id_only_takes_only_jobs_aimed_at_it(
    server: RunningServer, token: str, vagrant: vs_grpc.VagrantAsyncStub, runner_dir: Path
) -> None:
    anyone = await queue(vagrant, t.noop_job())
    mine = await queue(vagrant, t.noop_job("PICKY"))
    async with running_agent(
        server.address,
        runner_dir,
        token=token,
        plugins=plugins(),
        runner_id="picky",
        by_id_only=True,
    ):
        done = succeeded(await finished(vagrant, mine))
        assert done.assigned_runner.id == "picky"
        await asyncio.sleep(1.0)
        still = await vagrant.GetJob(vs.GetJobRequest(job_id=anyone))
        assert still.state == Job.QUEUED and not still.assigned_runner.id


async def burst(
    server: RunningServer, token: str, data_dir: Path, runner_id: str, **settings: Any
) -> Agent:
    """Run an agent in burst mode (max_jobs) until it returns by itself."""
    config = AgentSettings(
        address=server.address,
        token=token,
        runner_id=runner_id,
        data_dir=data_dir,
        heartbeat=0.2,
        **settings,
    )
    agent = Agent(config, plugins=plugins())
    await asyncio.wait_for(agent.run(), 60)
    return agent


async def test_max_jobs_stops_the_agent_after_that_many(
    server: RunningServer, token: str, vagrant: vs_grpc.VagrantAsyncStub, runner_dir: Path
) -> None:
    ids = [await queue(vagrant, t.noop_job()) for _ in range(3)]
    agent = await burst(server, token, runner_dir, "burst", max_jobs=2)
    assert agent.jobs_done == 2
    jobs = [await vagrant.GetJob(vs.GetJobRequest(job_id=job_id)) for job_id in ids]
    assert [j.state for j in jobs] == [Job.SUCCESS, Job.SUCCESS, Job.QUEUED]
    assert not jobs[2].assigned_runner.id


def freeze(seconds: float) -> None:
    """Block the event loop (the agent's and the test's): nothing of theirs runs."""
    time.sleep(seconds)


async def test_max_jobs_holds_when_assignments_arrive_together(
    backend_url: str, tmp_path: Path, runner_dir: Path
) -> None:
    server = t.ServerProcess(tmp_path / "server", backend_url)
    address = await asyncio.to_thread(server.start)
    try:
        config = AgentSettings(
            address=address, runner_id="burst", data_dir=runner_dir, concurrency=3, max_jobs=2
        )
        agent = Agent(config, plugins=plugins())
        task = asyncio.ensure_future(agent.run())
        await until_registered(agent, task)
        await until(lambda: len(agent._waiting) == 3, 10, "three workers wait for a job")

        def queue_four() -> None:
            with grpc.insecure_channel(address) as ch:
                stub = vs_grpc.VagrantStub(ch)
                for _ in range(4):
                    stub.QueueJob(vs.QueueJobRequest(job=t.noop_job()), timeout=10)

        thread = threading.Thread(target=queue_four)
        thread.start()
        freeze(1.5)  # meanwhile the server hands each waiting worker a job
        thread.join()
        await asyncio.wait_for(task, 30)
        assert agent.jobs_done <= 2, f"ran {agent.jobs_done} jobs with max_jobs=2"
    finally:
        await asyncio.to_thread(server.stop)


async def test_jobs_released_by_a_finishing_burst_agent_are_requeued_at_once(
    server: RunningServer, token: str, vagrant: vs_grpc.VagrantAsyncStub, runner_dir: Path
) -> None:
    # The other workers' pending requests are cancelled when one takes the allowed job;
    # a race: each round gives it a chance, and most rounds hit it.
    for round_ in range(10):
        runner_id = f"burst-{round_}"
        ids = [await queue(vagrant, t.noop_job(runner_id)) for _ in range(4)]
        await burst(server, token, runner_dir, runner_id, concurrency=4, max_jobs=1)
        deadline = time.monotonic() + 3
        while True:
            states = [(await vagrant.GetJob(vs.GetJobRequest(job_id=j))).state for j in ids]
            if Job.WAITING not in states:
                break
            assert time.monotonic() < deadline, f"round {round_}: a job is stuck WAITING"
            await asyncio.sleep(0.05)


async def test_stop_lets_the_running_job_finish_and_takes_no_more(
    server: RunningServer, token: str, vagrant: vs_grpc.VagrantAsyncStub, runner_dir: Path
) -> None:
    settings = AgentSettings(
        address=server.address, token=token, runner_id="drain", data_dir=runner_dir, heartbeat=0.2
    )
    agent = Agent(settings, plugins=plugins())
    task = asyncio.ensure_future(agent.run())
    try:
        await until_registered(agent, task)
        running = await queue(vagrant, exec_job("sleep 1; echo finished"))
        await t.wait_for_state(vagrant, running, Job.RUNNING)
        waiting = await queue(vagrant, t.noop_job())
        agent.stop()
        await asyncio.wait_for(asyncio.shield(task), 30)
    finally:
        task.cancel()
    done = succeeded(await finished(vagrant, running, timeout=1))
    assert stdout(await t.watch(vagrant, done.id)) == "finished\n"
    assert (await vagrant.GetJob(vs.GetJobRequest(job_id=waiting))).state == Job.QUEUED


class StopArrivesMidRequest(Agent):
    """The real Agent, with stop() landing in one exact spot: after a worker's loop
    has checked for a stop and before its request for the next job is registered
    as idle (while `call.write(Request)` is in flight). Only the timing is forced."""

    async def _one_job(self, stub: vs_grpc.VagrantAsyncStub) -> None:
        if self.jobs_done == 1 and not self._stop.is_set():
            self.stop()
            await asyncio.sleep(0.2)  # the session releases the idle workers meanwhile
        await super()._one_job(stub)


async def test_a_stop_during_the_next_request_still_stops_the_agent(
    server: RunningServer, token: str, vagrant: vs_grpc.VagrantAsyncStub, runner_dir: Path
) -> None:
    settings = AgentSettings(
        address=server.address, token=token, runner_id="late-stop", data_dir=runner_dir
    )
    agent = StopArrivesMidRequest(settings, plugins=plugins())
    task = asyncio.ensure_future(agent.run())
    try:
        await until_registered(agent, task)
        succeeded(await run(vagrant, t.noop_job()))
        done, _ = await asyncio.wait({task}, timeout=5)
        assert task in done, "the agent did not stop"
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@pytest.mark.parametrize("timeouts", [Timeouts(poll=0.25, heartbeat=1.5)], indirect=True)
async def test_heartbeats_keep_a_long_job_alive(
    server: RunningServer, token: str, vagrant: vs_grpc.VagrantAsyncStub, runner_dir: Path
) -> None:
    async with running_agent(
        server.address, runner_dir, token=token, plugins=plugins(), heartbeat=0.2
    ):
        succeeded(await run(vagrant, exec_job("sleep 3")))
    # Control: a runner that heartbeats too rarely loses the job to the timeout, and
    # the forced cancel that follows kills its command.
    async with running_agent(
        server.address, runner_dir, token=token, plugins=plugins(), runner_id="slow", heartbeat=60
    ):
        job_id = await queue(vagrant, exec_job("echo $$; sleep 30"))
        pgid = int(await first_output(vagrant, job_id))
        failed(await finished(vagrant, job_id, timeout=25), code_pb2.CANCELLED, "canceled")
        await group_gone(pgid, 10)


@pytest.mark.parametrize("bad", ["", "not-a-token"], ids=["none", "garbage"])
async def test_a_runner_without_a_valid_token_is_refused_not_retried(
    server: RunningServer, token: str, runner_dir: Path, bad: str
) -> None:
    settings = AgentSettings(
        address=server.address, token=bad, runner_id="anon", data_dir=runner_dir
    )
    agent = Agent(settings, plugins=plugins())
    with pytest.raises(aio.AioRpcError) as refused:
        await asyncio.wait_for(agent.run(), 30)
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert not agent.registered.is_set()


async def test_runner_started_before_the_server_waits_for_it(
    backend_url: str, tmp_path: Path, runner_dir: Path
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    server = t.ServerProcess(tmp_path / "server", backend_url, "--listen", address)
    try:
        async with running_agent(address, runner_dir, plugins=plugins(), registered=False) as a:
            await asyncio.sleep(1.5)  # a few failed connection attempts
            assert not a.registered.is_set()
            assert await asyncio.to_thread(server.start) == address
            await asyncio.wait_for(a.registered.wait(), 30)
            async with stub_for(address) as stub:
                succeeded(await run(stub, t.noop_job()))
    finally:
        if server.proc is not None and server.proc.poll() is None:
            await asyncio.to_thread(server.stop)


async def test_runner_reconnects_after_the_server_is_killed_and_restarted(
    backend_url: str, tmp_path: Path, runner_dir: Path
) -> None:
    port = free_port()
    address = f"127.0.0.1:{port}"
    server = t.ServerProcess(tmp_path / "server", backend_url, "--listen", address)
    await asyncio.to_thread(server.start)
    try:
        async with running_agent(address, runner_dir, plugins=plugins()) as agent:
            async with stub_for(address) as stub:
                succeeded(await run(stub, t.noop_job()))
            await asyncio.to_thread(server.kill)
            await until(lambda: not agent.registered.is_set(), 30, "the agent saw it go")
            assert await asyncio.to_thread(server.start) == address
            await asyncio.wait_for(agent.registered.wait(), 30)
            async with stub_for(address) as stub:
                job = succeeded(await run(stub, exec_job("echo back")))
                assert job.assigned_runner.id == "runner-1"
                assert stdout(await t.watch(stub, job.id)) == "back\n"
            assert agent.jobs_done == 2
    finally:
        if server.proc is not None and server.proc.poll() is None:
            await asyncio.to_thread(server.stop)


# -- a job in hand across a server restart (resume) ----------------------------------


@contextlib.asynccontextmanager
async def server_on_a_fixed_port(
    backend_url: str, tmp_path: Path, *args: str
) -> AsyncIterator[t.ServerProcess]:
    """`waystation server run` in its own process, on a port that stays the same
    across restarts (runners reconnect to their address)."""
    address = f"127.0.0.1:{free_port()}"
    server = t.ServerProcess(tmp_path / "server", backend_url, "--listen", address, *args)
    await asyncio.to_thread(server.start)
    try:
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            await asyncio.to_thread(server.kill)


async def until_line(stub: vs_grpc.VagrantAsyncStub, job_id: str, line: str) -> None:
    """Until the job's stdout has this line (read live from its stream)."""
    call = stub.GetJobStream(vs.GetJobStreamRequest(job_id=job_id))
    seen = ""
    try:
        async with asyncio.timeout(60):
            async for event in call:
                seen += stdout([event])
                if f"{line}\n" in seen:
                    return
    finally:
        call.cancel()
    raise AssertionError(f"job {job_id} ended without {line!r}")


@pytest.mark.parametrize(
    ("count", "outages"), [(30, 1), (200, 2)], ids=["ends-while-away", "runs-on-twice"]
)
async def test_a_job_in_hand_carries_on_across_a_kill_9_of_the_server(
    backend_url: str, tmp_path: Path, runner_dir: Path, count: int, outages: int
) -> None:
    """The command keeps running while the server is away (it may end meanwhile);
    once the server is back the runner resumes the job: every line once, in order,
    to a watcher of the restarted server too."""
    script = f"for i in $(seq 1 {count}); do echo line $i; sleep 0.05; done"
    expected = "".join(f"line {i}\n" for i in range(1, count + 1))
    async with server_on_a_fixed_port(backend_url, tmp_path) as server:
        async with running_agent(server.address, runner_dir, plugins=plugins()) as agent:
            async with stub_for(server.address) as stub:
                job_id = await queue(stub, exec_job(script))
                await first_output(stub, job_id)
            for outage in range(outages):
                if outage:  # the job runs on after the first: it goes on here meanwhile
                    async with stub_for(server.address) as stub:
                        await until_line(stub, job_id, f"line {count // 2}")
                await asyncio.to_thread(server.kill)
                await asyncio.sleep(1.0)  # away a while: output piles up on the runner
                assert await asyncio.to_thread(server.start) == server.address
            async with stub_for(server.address) as stub:
                watching = asyncio.ensure_future(t.watch(stub, job_id, timeout=90))
                succeeded(await finished(stub, job_id, timeout=90))
                assert stdout(await watching) == expected
                assert stdout(await t.watch(stub, job_id)) == expected
            assert agent.jobs_done == 1
        log = server.output()
        assert "heartbeat timeout" not in log, log


async def test_a_refused_resume_stops_the_command_and_reports_nothing(
    backend_url: str, tmp_path: Path, runner_dir: Path
) -> None:
    """The job ended while the server was away (here: force-cancelled in the
    database directly): the resume is refused, the runner stops the command and
    reports nothing more for it, then takes new work."""
    async with (
        server_on_a_fixed_port(backend_url, tmp_path) as server,
        running_agent(server.address, runner_dir, plugins=plugins()) as agent,
    ):
        async with stub_for(server.address) as stub:
            job_id = await queue(stub, exec_job("echo $$; sleep 60"))
            pgid = int(await first_output(stub, job_id))
        await asyncio.sleep(1.0)  # its line is persisted (the writer flushes within ~50 ms)
        await asyncio.to_thread(server.kill)
        store = await asyncio.to_thread(Store.open, backend_url)
        try:
            for _ in range(2):  # the second cancel forces it
                await store.job_cancel(job_id, now_us())
        finally:
            await store.close()
        assert await asyncio.to_thread(server.start) == server.address
        await group_gone(pgid, 60)
        async with stub_for(server.address) as stub:
            ended = failed(await finished(stub, job_id), code_pb2.CANCELLED, "canceled")
            assert stdout(await t.watch(stub, job_id)) == f"{pgid}\n"
            # It takes new work, on a fresh stream.
            done = succeeded(await run(stub, exec_job("echo next")))
            assert stdout(await t.watch(stub, done.id)) == "next\n"
            assert await stub.GetJob(vs.GetJobRequest(job_id=job_id)) == ended
        assert agent.jobs_done == 2


async def test_the_reconnect_backoff_starts_over_after_a_successful_reconnect(
    backend_url: str, tmp_path: Path, runner_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    delays: list[float] = []
    real = reconnect_pause

    async def recorded(why: str, delay: float, stop: asyncio.Event, most: float) -> float:
        delays.append(delay)
        return await real(why, delay, stop, most)

    monkeypatch.setattr("waystation.runner.agent.reconnect_pause", recorded)
    address = f"127.0.0.1:{free_port()}"
    server = t.ServerProcess(tmp_path / "server", backend_url, "--listen", address)
    try:
        async with running_agent(
            address, runner_dir, plugins=plugins(), registered=False, backoff_max=8.0
        ) as agent:
            await until(lambda: len(delays) >= 3, 60, "three failed attempts")
            assert delays[:3] == [0.5, 1.0, 2.0]  # it backs off while the server is away
            assert await asyncio.to_thread(server.start) == address
            await asyncio.wait_for(agent.registered.wait(), 60)
            before = len(delays)
            await asyncio.to_thread(server.kill)
            await until(lambda: len(delays) > before, 60, "a retry after the kill")
            assert delays[before] == 0.5  # the new outage starts over
            assert await asyncio.to_thread(server.start) == address
            await asyncio.wait_for(agent.registered.wait(), 60)
    finally:
        if server.proc is not None and server.proc.poll() is None:
            await asyncio.to_thread(server.stop)


@pytest.mark.parametrize("bad", ["not-a-token"], ids=["garbage"])
async def test_the_runner_command_refused_its_token_prints_one_line(
    server: RunningServer, token: str, runner_dir: Path, tmp_path: Path, bad: str
) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYSTATION_")}
    env |= {
        "WAYSTATION_ADDR": server.address,
        "WAYSTATION_TOKEN": bad,
        "WAYSTATION_CONFIG": str(tmp_path / "contexts.json"),
    }
    result = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "waystation.cli.main", "runner", "--id", "r1"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode != 0, t.show(result)
    assert "Traceback" not in result.stderr + result.stdout, t.show(result)
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1, t.show(result)
    assert errors[0].startswith("error: ") and "UNAUTHENTICATED" in errors[0], t.show(result)
