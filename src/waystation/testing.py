"""Factories and assertions for tests, ours and third parties' (plugins).

Factories always build valid records; pass only what a test is about.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf.empty_pb2 import Empty
from google.rpc import status_pb2
from grpc import aio

from waystation.client import Connection
from waystation.core.wire import RESUME_EVENTS, RESUME_JOB
from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc

_seq = itertools.count(1)


def basis(name: str | None = None, path: str | None = None, **fields: Any) -> vs.Basis:
    n = next(_seq)
    return vs.Basis(name=name or f"basis-{n}", path=path or f"/srv/basis-{n}", **fields)


def project(
    basis_ref: sdk.Ref.Basis, name: str | None = None, path: str | None = None, **fields: Any
) -> vs.Project:
    n = next(_seq)
    return vs.Project(
        name=name or f"project-{n}", path=path or f"/srv/project-{n}", basis=basis_ref, **fields
    )


def target(name: str | None = None, **fields: Any) -> vs.Target:
    return vs.Target(name=name or f"target-{next(_seq)}", **fields)


def box(
    name: str = "hashicorp/bionic64",
    version: str = "1.0.0",
    provider: str = "virtualbox",
    **fields: Any,
) -> vs.Box:
    return vs.Box(
        name=name,
        version=version,
        provider=provider,
        directory=fields.pop("directory", f"/boxes/{name}/{version}/{provider}"),
        **fields,
    )


def basis_ref(b: vs.Basis) -> sdk.Ref.Basis:
    return sdk.Ref.Basis(resource_id=b.resource_id, name=b.name, path=b.path)


def project_ref(p: vs.Project) -> sdk.Ref.Project:
    return sdk.Ref.Project(resource_id=p.resource_id, name=p.name, path=p.path, basis=p.basis)


async def rpc_error(call: Awaitable[Any]) -> aio.AioRpcError:
    """Await an RPC that must fail and return its error."""
    try:
        await call
    except aio.AioRpcError as exc:
        return exc
    raise AssertionError("the RPC succeeded but should have failed")


async def expect_status(
    call: Awaitable[Any], code: grpc.StatusCode, fragment: str = ""
) -> aio.AioRpcError:
    exc = await rpc_error(call)
    assert exc.code() == code, f"expected {code.name}, got {exc.code().name}: {exc.details()}"
    assert fragment in (exc.details() or ""), f"{fragment!r} not in {exc.details()!r}"
    return exc


class ServerProcess:
    """`waystation server run` as a child process, for restart and crash tests."""

    def __init__(self, data_dir: Path, db_url: str = "", *args: str, auth: bool = False) -> None:
        """With auth=False (most tests) the server runs in --dev mode; with auth=True
        the first start bootstraps it and keeps the login token in `.token`."""
        self.data_dir = data_dir
        self.db_url = db_url
        self.args = args if auth else ("--dev", *args)
        self.auth = auth
        self.token = ""
        self.log = data_dir / "server.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.address = ""

    def start(self, timeout: float = 60) -> str:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "waystation.cli.main", "server", "run"]
        cmd += ["--listen", "127.0.0.1:0", "--data-dir", str(self.data_dir), *self.args]
        if self.db_url:
            cmd += ["--db", self.db_url]
        offset = self.log.stat().st_size if self.log.exists() else 0
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_bytes()[offset:].decode(errors="replace")
            found = re.search(r"listening on (\S+)", text)
            if found:
                self.address = found.group(1)
                if self.auth and not self.token:
                    self.token = self._bootstrap()
                return self.address
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{text}")
            time.sleep(0.05)
        raise TimeoutError(f"server did not start within {timeout}s")

    def _bootstrap(self) -> str:
        with grpc.insecure_channel(self.address) as channel:
            response = vs_grpc.VagrantStub(channel).BootstrapToken(Empty(), timeout=30)
            return str(response.token)

    def connection(self) -> Connection:
        return Connection(self.address, self.token)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, as in a crash."""
        self.stop(signal.SIGKILL)

    def output(self) -> str:
        return self.log.read_text(errors="replace")


def noop_job(runner_id: str | None = None, **fields: Any) -> vs.Job:
    """A valid job: a Noop for any runner, or for the given runner id."""
    runner = (
        vs.Ref.Runner(id=vs.Ref.RunnerId(id=runner_id))
        if runner_id
        else vs.Ref.Runner(any=vs.Ref.RunnerAny())
    )
    fields.setdefault("noop", vs.Job.Noop())
    return vs.Job(target_runner=runner, **fields)


def command_job(target: sdk.Ref.Target, command: str = "up", **fields: Any) -> vs.Job:
    return vs.Job(
        target=target,
        target_runner=vs.Ref.Runner(any=vs.Ref.RunnerAny()),
        command=vs.Job.CommandOp(command=command),
        **fields,
    )


def lines_event(*lines: str) -> vs.GetJobStreamResponse.Terminal:
    Terminal = vs.GetJobStreamResponse.Terminal
    return Terminal(events=[Terminal.Event(line=Terminal.Event.Line(msg=m)) for m in lines])


class FakeRunner:
    """A scripted runner speaking the real protocol over a real channel.

    `await register()` opens its RunnerConfig stream (kept open, as a real
    runner does); `job_stream()` opens one RunnerJobStream.
    """

    def __init__(self, channel: aio.Channel, runner_id: str, by_id_only: bool = False) -> None:
        self.stub = vs_grpc.VagrantStub(channel)
        self.runner = vs.Runner(id=runner_id, by_id_only=by_id_only)
        self.config_call: Any = None
        self.configs: list[vs.RunnerConfig] = []

    async def register(self) -> vs.RunnerConfig:
        open_ = vs.RunnerConfigRequest(open=vs.RunnerConfigRequest.Open(runner=self.runner))
        queue: asyncio.Queue[vs.RunnerConfigRequest | None] = asyncio.Queue()
        await queue.put(open_)

        async def requests() -> AsyncIterator[vs.RunnerConfigRequest]:
            while (item := await queue.get()) is not None:
                yield item

        self._config_queue = queue
        self.config_call = self.stub.RunnerConfig(requests())
        return await self.next_config()

    async def next_config(self) -> vs.RunnerConfig:
        response = await self.config_call.read()
        self.configs.append(response.config)
        return response.config  # type: ignore[no-any-return]

    async def close(self) -> None:
        if self.config_call is not None:
            await self._config_queue.put(None)
            self.config_call.cancel()

    def job_stream(self) -> JobStream:
        return JobStream(self.stub, self.runner.id)

    def resume_stream(self, job_id: str, runner_id: str | None = None) -> JobStream:
        """A RunnerJobStream that resumes `job_id` (waystation's extension)."""
        return JobStream(self.stub, runner_id or self.runner.id, resume=job_id)


class JobStream:
    Req = vs.RunnerJobStreamRequest

    def __init__(self, stub: Any, runner_id: str, resume: str = "") -> None:
        self.call = stub.RunnerJobStream(metadata=((RESUME_JOB, resume),) if resume else None)
        self.runner_id = runner_id

    async def send(self, **event: Any) -> None:
        await self.call.write(self.Req(**event))

    async def request(self) -> None:
        await self.send(request=self.Req.Request(runner_id=self.runner_id))

    async def assignment(self, timeout: float = 30) -> vs.Job:
        response = await asyncio.wait_for(self.call.read(), timeout)
        assert response.WhichOneof("event") == "assignment", response
        return response.assignment.job  # type: ignore[no-any-return]

    async def take(self, timeout: float = 30) -> vs.Job:
        """Request, receive an assignment and ack it."""
        await self.request()
        job = await self.assignment(timeout)
        await self.send(ack=self.Req.Ack())
        return job

    async def resumed(self, timeout: float = 30) -> tuple[vs.Job, int]:
        """Request on a resume stream: the job's Assignment again, and how many of
        its output events the server holds (the response header)."""
        await self.request()
        job = await self.assignment(timeout)
        header = dict(await self.call.initial_metadata())
        return job, int(header[RESUME_EVENTS])

    async def output(self, *lines: str) -> None:
        await self.send(terminal=lines_event(*lines))

    async def heartbeat(self) -> None:
        await self.send(heartbeat=self.Req.Heartbeat())

    async def complete(self, result: vs.Job.Result | None = None) -> None:
        await self.send(complete=self.Req.Complete(result=result))
        await self.call.done_writing()

    async def fail(self, message: str = "it broke", code: int = 2) -> None:
        await self.send(error=self.Req.Error(error=status_pb2.Status(code=code, message=message)))
        await self.call.done_writing()

    async def read(self, timeout: float = 30) -> Any:
        return await asyncio.wait_for(self.call.read(), timeout)

    def cancel(self) -> None:
        self.call.cancel()


async def watch(stub: Any, job_id: str, timeout: float = 60) -> list[vs.GetJobStreamResponse]:
    """Every GetJobStream event of a job until the stream ends."""
    events: list[vs.GetJobStreamResponse] = []

    async def collect() -> None:
        async for event in stub.GetJobStream(vs.GetJobStreamRequest(job_id=job_id)):
            events.append(event)

    await asyncio.wait_for(collect(), timeout)
    return events


def terminal_lines(events: list[vs.GetJobStreamResponse]) -> list[str]:
    return [
        e.line.msg
        for event in events
        if event.WhichOneof("event") == "terminal"
        for e in event.terminal.events
        if e.WhichOneof("event") == "line"
    ]


async def wait_for_state(stub: Any, job_id: str, state: int, timeout: float = 30) -> vs.Job:
    deadline = time.monotonic() + timeout
    while True:
        job = await stub.GetJob(vs.GetJobRequest(job_id=job_id))
        if job.state == state:
            return job  # type: ignore[no-any-return]
        if time.monotonic() > deadline:
            name = vs.Job.State.Name(job.state)
            raise AssertionError(f"job {job_id} is {name}, not {vs.Job.State.Name(state)}")  # type: ignore[arg-type]
        await asyncio.sleep(0.05)


# -- the CLI as a subprocess ---------------------------------------------------------


def show(result: subprocess.CompletedProcess[str]) -> str:
    """A CLI run, for assertion messages."""
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def assert_cli_error(result: subprocess.CompletedProcess[str], *fragments: str) -> str:
    """Exit 1, nothing on stdout, exactly one `error: ...` line on stderr, no traceback."""
    assert "Traceback" not in result.stderr + result.stdout, show(result)
    assert result.returncode == 1, show(result)
    assert result.stdout == "", show(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1, show(result)
    assert lines[0].startswith("error: "), show(result)
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def cli_table(stdout: str) -> tuple[list[str], list[list[str]]]:
    """A `list` table as its header and rows, split on runs of spaces."""
    header, *rows = (line.split() for line in stdout.splitlines() if line.strip())
    return header, rows


# -- provisioning ------------------------------------------------------------------


def echo_template(
    resources: list[Any] | None = None,
    state: bytes = b"state-1",
    parameters: list[Any] | None = None,
    variables: list[Any] | None = None,
    logs: tuple[str, ...] = ("hello from echo",),
    hold_apply: bool = False,
) -> bytes:
    """An echo archive: parse (variables), plan and apply with logs, resources and state.
    With hold_apply the apply never completes (it waits for a cancel)."""
    from waystation.protocol.provisionersdk.proto import provisioner_pb2 as psdk
    from waystation.provisioner import echo

    found = resources or []
    log_lines = [psdk.Response(log=psdk.Log(level=psdk.INFO, output=line)) for line in logs]
    apply = [*log_lines]
    if not hold_apply:
        apply.append(psdk.Response(apply=psdk.ApplyComplete(state=state, resources=found)))
    return echo.tar(
        parse=[psdk.Response(parse=psdk.ParseComplete(template_variables=variables or []))],
        plan=[
            *log_lines,
            psdk.Response(plan=psdk.PlanComplete(resources=found, parameters=parameters or [])),
        ],
        apply=apply,
    )


def push_request(
    name: str = "tpl", archive: bytes | None = None, provisioner: str = "echo", **fields: Any
) -> Any:
    from waystation.protocol.waystation.v1 import provisioning_pb2 as pv

    return pv.PushTemplateRequest(
        template=name,
        provisioner=provisioner,
        archive=archive if archive is not None else echo_template(),
        **fields,
    )


async def wait_provisioner_job(stub: Any, job_id: str, *statuses: int, timeout: float = 60) -> Any:
    """Poll GetProvisionerJob until its status is one of `statuses` (default: ended)."""
    from waystation.protocol.waystation.v1 import provisioning_pb2 as pv

    Job = pv.ProvisionerJob
    wanted = statuses or (Job.SUCCEEDED, Job.FAILED, Job.CANCELED)
    deadline = time.monotonic() + timeout
    while True:
        job = await stub.GetProvisionerJob(pv.GetProvisionerJobRequest(id=job_id))
        if job.status in wanted:
            return job
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} is {Job.Status.Name(job.status)}, not {wanted}")
        await asyncio.sleep(0.05)


def daemon_metadata(
    daemon_id: str = "d1", provisioners: tuple[str, ...] = ("echo",), **tags: str
) -> list[tuple[str, str]]:
    """The identity metadata of a provisioner daemon (for raw ProvisionerDaemon calls)."""
    md = [("provisioner-daemon-id", daemon_id)]
    md += [("provisioner-daemon-provisioner", p) for p in provisioners]
    md += [("provisioner-daemon-tag", f"{k}={v}") for k, v in tags.items()]
    return md


@contextlib.asynccontextmanager
async def running_daemon(
    address: str,
    token: str = "",
    daemon_id: str = "d1",
    provisioners: tuple[str, ...] = ("echo",),
    tags: dict[str, str] | None = None,
    **settings: Any,
) -> AsyncIterator[Any]:
    """A provisioner daemon in this process, stopped (and awaited) on exit."""
    from waystation.provisioner.base import load
    from waystation.provisioner.daemon import DaemonSettings, ProvisionerDaemon

    config = DaemonSettings(
        address=address,
        token=token,
        daemon_id=daemon_id,
        provisioners=list(provisioners),
        tags=tags or {},
        **settings,
    )
    daemon = ProvisionerDaemon(config, load(list(provisioners)))
    task = asyncio.ensure_future(daemon.run())
    try:
        yield daemon
    finally:
        daemon.stop(now=True)
        try:
            async with asyncio.timeout(30):
                await task
        except TimeoutError:
            task.cancel()
