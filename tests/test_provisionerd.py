"""`provisionerd.ProvisionerDaemon` driven raw, as an independent daemon would:
a stub on the authed channel, the daemon's identity as gRPC metadata on every
call. Jobs are made with the Provisioning service. Both backends.

Most tests run with a short AcquireJob long poll and a long hang timeout; the
hang tests ask for a short one through the `timeouts` fixture (indirect).
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import random
import tarfile
import time
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from grpc import aio

from waystation.client import Connection
from waystation.core.timeouts import Timeouts
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.provisionerd.proto import provisionerd_pb2_grpc as pd_grpc
from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.protocol.waystation.v1 import provisioning_pb2_grpc as pv_grpc
from waystation.server.app import RunningServer
from waystation.testing import daemon_metadata, expect_status, wait_provisioner_job

Job = pv.ProvisionerJob
Code = grpc.StatusCode
if TYPE_CHECKING:  # the async stubs exist only in the type stubs
    Stub = pd_grpc.ProvisionerDaemonAsyncStub
    Prov = pv_grpc.ProvisioningAsyncStub
Metadata = list[tuple[str, str]]

DEFAULT_TIMEOUTS = Timeouts(poll=0.25, provisioner_hang=120.0, acquire_long_poll=0.5)
HANG_TIMEOUTS = Timeouts(poll=0.25, provisioner_hang=1.0, acquire_long_poll=0.5)
# Updates every 0.3 s against a 2 s hang: a slow machine's stalls do not end the job.
KEEPALIVE_TIMEOUTS = Timeouts(poll=0.25, provisioner_hang=2.0, acquire_long_poll=0.5)
EOF: object = aio.EOF  # type: ignore[attr-defined]  # missing from grpc-stubs
STEP = 30.0  # generous bound on any single wait; never an assertion on durations


@pytest.fixture
def timeouts(request: pytest.FixtureRequest) -> Timeouts:
    """Short long poll; a test may ask for other timeouts with indirect parametrization."""
    return getattr(request, "param", DEFAULT_TIMEOUTS)


@pytest.fixture
def prov(channel: aio.Channel) -> Prov:
    return pv_grpc.ProvisioningStub(channel)


@pytest.fixture
def stub(channel: aio.Channel) -> Stub:
    return pd_grpc.ProvisionerDaemonStub(channel)


# -- helpers ---------------------------------------------------------------------------


def tar(files: dict[str, bytes] | None = None) -> bytes:
    """A plain tar archive (what PushTemplate accepts); the server does not read it."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:") as archive:
        for name, data in (files or {"main.tf": b"# nothing\n"}).items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


TINY = tar()


def md(daemon_id: str = "d1", provisioners: tuple[str, ...] = ("echo",), **tags: str) -> Metadata:
    return daemon_metadata(daemon_id, provisioners, **tags)


async def bounded(call: Awaitable[Any], timeout: float = STEP) -> Any:
    return await asyncio.wait_for(call, timeout)


async def push(
    prov: Prov,
    name: str = "tpl",
    archive: bytes = TINY,
    provisioner: str = "echo",
    tags: dict[str, str] | None = None,
    variables: dict[str, str] | None = None,
) -> pv.TemplateVersion:
    pushed = await prov.PushTemplate(
        pv.PushTemplateRequest(
            template=name,
            provisioner=provisioner,
            archive=archive,
            tags=tags or {},
            user_variable_values=[
                sdk.VariableValue(name=k, value=v) for k, v in (variables or {}).items()
            ],
        )
    )
    return pushed.version


async def acquire(stub: Stub, metadata: Metadata) -> pd.AcquiredJob:
    """The deprecated long poll: a job, or an empty one after the (short) poll."""
    job: pd.AcquiredJob = await stub.AcquireJob(pd.Empty(), metadata=metadata, timeout=STEP)
    return job


async def acquire_id(stub: Stub, metadata: Metadata, job_id: str) -> pd.AcquiredJob:
    job = await acquire(stub, metadata)
    assert job.job_id == job_id, job
    return job


async def get_job(prov: Prov, job_id: str) -> pv.ProvisionerJob:
    job: pv.ProvisionerJob = await prov.GetProvisionerJob(pv.GetProvisionerJobRequest(id=job_id))
    return job


async def get_version(prov: Prov, version_id: str) -> pv.TemplateVersion:
    version: pv.TemplateVersion = await prov.GetTemplateVersion(
        pv.GetTemplateVersionRequest(version=version_id)
    )
    return version


async def import_template(
    prov: Prov,
    stub: Stub,
    name: str = "tpl",
    metadata: Metadata | None = None,
    parameters: list[sdk.RichParameter] | None = None,
    **push_args: Any,
) -> pv.TemplateVersion:
    """Push a template and complete its import as a raw daemon would: an active version."""
    metadata = metadata or md()
    version = await push(prov, name, **push_args)
    await acquire_id(stub, metadata, version.job_id)
    completed = pd.CompletedJob.TemplateImport(rich_parameters=parameters or [])
    await stub.CompleteJob(
        pd.CompletedJob(job_id=version.job_id, template_import=completed), metadata=metadata
    )
    assert (await get_job(prov, version.job_id)).status == Job.SUCCEEDED
    return await get_version(prov, version.id)


async def create_workspace(
    prov: Prov, name: str, owner: str, template: str = "tpl", **fields: Any
) -> pv.BuildResponse:
    created: pv.BuildResponse = await prov.CreateWorkspace(
        pv.CreateWorkspaceRequest(name=name, owner=owner, template=template, **fields)
    )
    return created


async def build(
    prov: Prov, owner: str, name: str, transition: sdk.WorkspaceTransition.ValueType
) -> pv.BuildResponse:
    built: pv.BuildResponse = await prov.BuildWorkspace(
        pv.BuildWorkspaceRequest(
            workspace=pv.WorkspaceRef(owner=owner, name=name), transition=transition
        )
    )
    return built


async def complete_build(
    stub: Stub,
    job_id: str,
    metadata: Metadata,
    state: bytes = b"",
    resources: list[sdk.Resource] | None = None,
) -> None:
    done = pd.CompletedJob.WorkspaceBuild(state=state, resources=resources or [])
    await stub.CompleteJob(pd.CompletedJob(job_id=job_id, workspace_build=done), metadata=metadata)


async def watch(prov: Prov, job_id: str) -> tuple[list[pd.Log], list[pv.ProvisionerJob]]:
    """Every log line and job event WatchProvisionerJob streams until the job's end."""
    logs: list[pd.Log] = []
    states: list[pv.ProvisionerJob] = []

    async def collect() -> None:
        async for event in prov.WatchProvisionerJob(pv.WatchProvisionerJobRequest(id=job_id)):
            if event.HasField("job"):
                states.append(event.job)
            logs.extend(event.logs.logs)

    await bounded(collect(), 60)
    return logs, states


async def daemon_seen(prov: Prov, daemon_id: str) -> None:
    """Wait until the server has looked for work for this daemon (it is parked)."""
    deadline = time.monotonic() + STEP
    while time.monotonic() < deadline:
        listed = await prov.ListProvisionerDaemons(pv.ListProvisionerDaemonsRequest())
        if any(d.id == daemon_id and d.online for d in listed.daemons):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"daemon {daemon_id} never showed up")


async def ownership_errors(call: Any, make: Any, pending_id: str, running_id: str) -> None:
    """The four errors every job report shares: unknown, pending, not ours (and the
    completed one, tested by each caller after completing)."""
    await expect_exact(call(make("01UNKNOWNJOB"), metadata=md()), Code.NOT_FOUND, "job not found")
    await expect_exact(
        call(make(pending_id), metadata=md()), Code.FAILED_PRECONDITION, "job isn't running yet"
    )
    await expect_exact(
        call(make(running_id), metadata=md("intruder")),
        Code.PERMISSION_DENIED,
        "you don't own this job",
    )


async def expect_exact(call: Awaitable[Any], code: grpc.StatusCode, message: str) -> None:
    """The RPC fails with exactly this code and message."""
    exc = await expect_status(call, code)
    assert exc.details() == message


# -- 1. AcquireJob (deprecated long poll) ----------------------------------------------


async def test_acquire_job_empty_after_long_poll(stub: Stub) -> None:
    job = await acquire(stub, md())
    assert job == pd.AcquiredJob()
    assert job.job_id == ""


async def test_acquire_job_carries_import_then_builds(prov: Prov, stub: Stub) -> None:
    archive = tar({"main.tf": b"resource {}\n", "README.md": b"# hello\n"})
    version = await push(
        prov, "base", archive=archive, tags={"team": "core"}, variables={"region": "eu"}
    )
    daemon = md(team="core")
    before = time.time() * 1000
    job = await acquire(stub, daemon)
    assert job.job_id == version.job_id
    assert job.provisioner == "echo"
    assert job.user_name == ""  # an import has no workspace owner
    assert job.template_source_archive == archive
    assert job.WhichOneof("type") == "template_import"
    shown = await get_job(prov, job.job_id)
    assert job.created_at == shown.created_at.ToMilliseconds()
    assert abs(job.created_at - before) < 10 * 60 * 1000  # milliseconds, not micro or seconds
    meta = job.template_import.metadata
    assert (meta.template_name, meta.template_version) == ("base", version.name)
    assert meta.template_id == version.template_id
    assert [(v.name, v.value) for v in job.template_import.user_variable_values] == [
        ("region", "eu")
    ]
    assert shown.status == Job.RUNNING and shown.daemon_id == "d1"
    assert shown.started_at.ToMicroseconds() >= shown.created_at.ToMicroseconds() > 0

    # The import finds variables and a parameter; builds get their values.
    variables = [
        sdk.TemplateVariable(name="region", type="string", default_value="us"),
        sdk.TemplateVariable(name="size", type="string", default_value="m", sensitive=True),
    ]
    update = pd.UpdateJobRequest(job_id=job.job_id, template_variables=variables)
    answered = await stub.UpdateJob(update, metadata=daemon)
    assert [(v.name, v.value, v.sensitive) for v in answered.variable_values] == [
        ("region", "eu", False),
        ("size", "m", True),
    ]
    parameter = sdk.RichParameter(name="flavor", type="string", default_value="small", mutable=True)
    done = pd.CompletedJob.TemplateImport(rich_parameters=[parameter])
    await stub.CompleteJob(
        pd.CompletedJob(job_id=job.job_id, template_import=done), metadata=daemon
    )

    flavor = [sdk.RichParameterValue(name="flavor", value="large")]
    created = await create_workspace(prov, "ws", "alice", "base", rich_parameter_values=flavor)
    first = await acquire(stub, daemon)
    assert first.job_id == created.build.job_id
    assert first.user_name == "alice"
    assert first.template_source_archive == archive
    assert first.WhichOneof("type") == "workspace_build"
    wb = first.workspace_build
    assert wb.workspace_build_id == created.build.id
    assert wb.workspace_name == "ws"
    assert (wb.metadata.workspace_name, wb.metadata.workspace_owner) == ("ws", "alice")
    assert wb.metadata.workspace_id == created.workspace.id
    assert wb.metadata.workspace_transition == sdk.START
    assert wb.metadata.workspace_build_id == created.build.id
    assert (wb.metadata.template_name, wb.metadata.template_version) == ("base", version.name)
    assert [(v.name, v.value) for v in wb.variable_values] == [("region", "eu"), ("size", "m")]
    assert [(p.name, p.value) for p in wb.rich_parameter_values] == [("flavor", "large")]
    assert wb.state == b""
    await complete_build(stub, first.job_id, daemon, state=b"tfstate-1")

    stopped = await build(prov, "alice", "ws", sdk.STOP)
    second = await acquire(stub, daemon)
    assert second.job_id == stopped.build.job_id
    assert second.workspace_build.metadata.workspace_transition == sdk.STOP
    assert second.workspace_build.workspace_build_id == stopped.build.id
    assert second.workspace_build.state == b"tfstate-1"
    assert [(p.name, p.value) for p in second.workspace_build.rich_parameter_values] == [
        ("flavor", "large")
    ]
    await complete_build(stub, second.job_id, daemon, state=b"tfstate-2")

    dry = await prov.DryRun(pv.DryRunRequest(version=version.id, owner="bob", workspace_name="x"))
    third = await acquire(stub, daemon)
    assert third.job_id == dry.id
    assert third.WhichOneof("type") == "template_dry_run"
    assert third.user_name == "bob"
    assert third.template_dry_run.metadata.workspace_name == "x"
    assert third.template_dry_run.metadata.template_name == "base"
    assert [(p.name, p.value) for p in third.template_dry_run.rich_parameter_values] == [
        ("flavor", "small")
    ]
    resources = [sdk.Resource(name="vm", type="echo_vm")]
    dry_done = pd.CompletedJob.TemplateDryRun(resources=resources)
    await stub.CompleteJob(
        pd.CompletedJob(job_id=dry.id, template_dry_run=dry_done), metadata=daemon
    )
    shown = await get_job(prov, dry.id)
    assert shown.status == Job.SUCCEEDED
    assert list(shown.dry_run_resources) == resources


async def test_acquire_takes_the_oldest_fitting_job_first(prov: Prov, stub: Stub) -> None:
    pushed = [await push(prov, f"t{i}") for i in range(4)]
    await prov.CancelProvisionerJob(pv.CancelProvisionerJobRequest(id=pushed[1].job_id))
    order = [(await acquire(stub, md(f"d{i}"))).job_id for i in range(4)]
    assert order == [pushed[0].job_id, pushed[2].job_id, pushed[3].job_id, ""]
    assert [(await get_job(prov, v.job_id)).daemon_id for v in pushed] == ["d0", "", "d1", "d2"]


# -- 2. AcquireJobWithCancel -----------------------------------------------------------


class AcquireCall:
    """One AcquireJobWithCancel call. Its requests come from a queue we end on exit:
    grpc's request-consumer task (the authed channel's interceptors make one) would
    otherwise be left pending when the server ends the stream first."""

    def __init__(self, stub: Stub, metadata: Metadata) -> None:
        self._requests: asyncio.Queue[pd.CancelAcquire | None] = asyncio.Queue()
        self.call: Any = stub.AcquireJobWithCancel(self._iterate(), metadata=metadata, timeout=120)

    async def _iterate(self) -> AsyncIterator[pd.CancelAcquire]:
        while (item := await self._requests.get()) is not None:
            yield item

    def cancel_acquire(self) -> None:
        self._requests.put_nowait(pd.CancelAcquire())

    def half_close(self) -> None:
        self._requests.put_nowait(None)

    async def read(self) -> Any:
        return await self.call.read()

    async def end(self) -> None:
        """The end of the stream after its one message, once we sent CancelAcquire.

        grpc-python marks a call INTERNAL ("Internal error from Core") on the client
        when one of its writes loses the race with the server ending the stream; that
        is our late CancelAcquire, not an answer of the server's, so it counts as the
        end. Any other error, or another message, fails."""
        try:
            assert await bounded(self.read()) is EOF
        except aio.AioRpcError as exc:
            local = exc.details() == "Internal error from Core"
            assert local and "SendMessageOperation" in (exc.debug_error_string() or ""), exc

    async def one_then_end(self) -> pd.AcquiredJob:
        """Exactly one AcquiredJob, then the end of the stream with OK."""
        first = await bounded(self.read())
        assert isinstance(first, pd.AcquiredJob), first
        assert await bounded(self.read()) is EOF
        assert await bounded(self.call.code()) == Code.OK
        return first

    async def __aenter__(self) -> AcquireCall:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._requests.put_nowait(None)
        if not self.call.done():
            self.call.cancel()


async def test_cancel_acquire_while_idle_answers_one_empty_job(prov: Prov, stub: Stub) -> None:
    async with AcquireCall(stub, md()) as call:
        await daemon_seen(prov, "d1")
        call.cancel_acquire()
        assert await call.one_then_end() == pd.AcquiredJob()


async def test_half_close_ends_with_an_empty_job(prov: Prov, stub: Stub) -> None:
    async with AcquireCall(stub, md()) as call:
        await daemon_seen(prov, "d1")
        call.half_close()
        assert await call.one_then_end() == pd.AcquiredJob()


LEASE_TIMEOUTS = Timeouts(
    poll=0.25, provisioner_hang=120.0, acquire_long_poll=0.5, runner_lease=2.0
)


@pytest.mark.parametrize("timeouts", [LEASE_TIMEOUTS], indirect=True, ids=["lease2s"])
async def test_a_parked_daemon_stays_online_past_its_first_lease(prov: Prov, stub: Stub) -> None:
    """Parked daemons' leases are renewed (every quarter lease, with the runners')."""
    async with AcquireCall(stub, md()) as call:
        await daemon_seen(prov, "d1")
        await asyncio.sleep(2 * LEASE_TIMEOUTS.runner_lease)
        listed = await prov.ListProvisionerDaemons(pv.ListProvisionerDaemonsRequest())
        assert [d.online for d in listed.daemons if d.id == "d1"] == [True]
        call.cancel_acquire()
        assert await call.one_then_end() == pd.AcquiredJob()


async def test_job_queued_while_waiting_is_sent_once(prov: Prov, stub: Stub) -> None:
    async with AcquireCall(stub, md()) as call:
        await daemon_seen(prov, "d1")
        version = await push(prov)
        job = await call.one_then_end()
    assert job.job_id == version.job_id
    assert job.WhichOneof("type") == "template_import"
    assert job.template_source_archive == TINY
    shown = await get_job(prov, version.job_id)
    assert (shown.status, shown.daemon_id) == (Job.RUNNING, "d1")
    # A job already queued is answered at once, and a CancelAcquire after it changes nothing.
    other = await push(prov, "other")
    async with AcquireCall(stub, md()) as call:
        second = await bounded(call.read())
        call.cancel_acquire()
        await call.end()
    assert second.job_id == other.job_id
    assert (await get_job(prov, other.job_id)).status == Job.RUNNING


BROKEN = "connection to provisioner daemon broken"


async def settle_raced_job(
    prov: Prov, stub: Stub, job_id: str, metadata: Metadata, received: bool
) -> str:
    """After a cancelled AcquireJobWithCancel: how the race ended, once nothing is in
    flight any more; a job held by the daemon is completed by it, a pending one cancelled."""
    deadline = time.monotonic() + 10  # a broken stream fails the job in the background
    job = await get_job(prov, job_id)
    while job.status == Job.RUNNING and not received and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
        job = await get_job(prov, job_id)
    if job.status == Job.FAILED:
        assert (job.error, job.daemon_id) == (BROKEN, metadata[0][1])
        return "failed: connection broken"
    if job.status == Job.PENDING:
        assert not received
        await prov.CancelProvisionerJob(pv.CancelProvisionerJobRequest(id=job_id))
        outcome = "never locked"
    else:
        # Delivered; or written by the server on a healthy stream and dropped by the
        # client's transport on its cancel. Either way it is this daemon's, by id.
        assert job.status == Job.RUNNING, Job.Status.Name(job.status)
        assert job.daemon_id == metadata[0][1]
        done = pd.CompletedJob(job_id=job_id, template_import=pd.CompletedJob.TemplateImport())
        await stub.CompleteJob(done, metadata=metadata)
        outcome = "delivered" if received else "sent, dropped by the client"
    # Nothing raced in afterwards (a lock committing late is failed as broken).
    await asyncio.sleep(0.2)
    final = await get_job(prov, job_id)
    if final.status == Job.FAILED:
        assert final.error == BROKEN and outcome == "never locked", (outcome, final)
        return "failed: connection broken (late)"
    assert final.status in (Job.SUCCEEDED, Job.CANCELED), (outcome, final)
    return outcome


async def test_client_cancel_right_after_lock_never_strands_the_job(prov: Prov, stub: Stub) -> None:
    """Race the client's cancel against the lock: whatever wins, the job is not left
    RUNNING without a daemon that knows it. Several rounds at different delays."""
    outcomes: dict[str, int] = defaultdict(int)
    delays = [0.0, 0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2]
    for round_, delay in enumerate(delays):
        daemon_id = f"racer-{round_}"
        metadata = md(daemon_id)
        received: pd.AcquiredJob | None = None
        async with AcquireCall(stub, metadata) as call:
            reading = asyncio.ensure_future(call.read())
            await daemon_seen(prov, daemon_id)
            version = await push(prov, f"race-{round_}")
            await asyncio.sleep(delay)
            call.call.cancel()
            with contextlib.suppress(asyncio.CancelledError, aio.AioRpcError):
                got = await bounded(reading)
                if isinstance(got, pd.AcquiredJob) and got.job_id:
                    received = got
        if received is not None:
            assert received.job_id == version.job_id
        outcome = await settle_raced_job(prov, stub, version.job_id, metadata, received is not None)
        outcomes[outcome] += 1
    assert sum(outcomes.values()) == len(delays), outcomes


# -- 3. identity metadata --------------------------------------------------------------


async def expect_acquire_call_status(
    stub: Stub, metadata: Metadata, message: str, code: grpc.StatusCode = Code.INVALID_ARGUMENT
) -> None:
    """AcquireJobWithCancel fails with exactly this code and message on its first read."""
    async with AcquireCall(stub, metadata) as call:
        await expect_exact(call.read(), code, message)


async def test_identity_metadata_errors(stub: Stub) -> None:
    no_id = [("provisioner-daemon-provisioner", "echo")]
    needs_id = "provisioner daemon id is required: send it as provisioner-daemon-id metadata"
    await expect_exact(stub.AcquireJob(pd.Empty(), metadata=no_id), Code.INVALID_ARGUMENT, needs_id)
    await expect_exact(
        stub.UpdateJob(pd.UpdateJobRequest(job_id="x"), metadata=no_id),
        Code.INVALID_ARGUMENT,
        needs_id,
    )
    await expect_exact(
        stub.CompleteJob(pd.CompletedJob(job_id="x"), metadata=[]), Code.INVALID_ARGUMENT, needs_id
    )
    await expect_exact(
        stub.FailJob(pd.FailedJob(job_id="x"), metadata=[]), Code.INVALID_ARGUMENT, needs_id
    )
    await expect_exact(
        stub.CommitQuota(pd.CommitQuotaRequest(job_id="x"), metadata=[]),
        Code.INVALID_ARGUMENT,
        needs_id,
    )
    await expect_acquire_call_status(stub, no_id, needs_id)
    no_provisioner = [("provisioner-daemon-id", "d1")]
    serve = (
        "a daemon must serve at least one provisioner: send provisioner-daemon-provisioner metadata"
    )
    await expect_exact(
        stub.AcquireJob(pd.Empty(), metadata=no_provisioner), Code.INVALID_ARGUMENT, serve
    )
    await expect_acquire_call_status(stub, no_provisioner, serve)
    blank = [("provisioner-daemon-id", "d1"), ("provisioner-daemon-provisioner", " , ")]
    await expect_exact(stub.AcquireJob(pd.Empty(), metadata=blank), Code.INVALID_ARGUMENT, serve)
    bad_tag = [*md(), ("provisioner-daemon-tag", "novalue")]
    tag_error = "provisioner-daemon-tag must be key=value, got 'novalue'"
    await expect_exact(
        stub.AcquireJob(pd.Empty(), metadata=bad_tag), Code.INVALID_ARGUMENT, tag_error
    )
    await expect_acquire_call_status(stub, bad_tag, tag_error)
    await expect_exact(
        stub.UpdateJob(pd.UpdateJobRequest(job_id="x"), metadata=bad_tag),
        Code.INVALID_ARGUMENT,
        tag_error,
    )
    no_name = [*md(), ("provisioner-daemon-tag", "=v")]
    await expect_status(
        stub.AcquireJob(pd.Empty(), metadata=no_name), Code.INVALID_ARGUMENT, "must be key=value"
    )
    spaced = [("provisioner-daemon-id", "d 1"), ("provisioner-daemon-provisioner", "echo")]
    await expect_status(
        stub.AcquireJob(pd.Empty(), metadata=spaced), Code.INVALID_ARGUMENT, "contains spaces"
    )


# -- 4. tags and provisioner types -----------------------------------------------------


async def test_jobs_go_only_to_daemons_that_fit(prov: Prov, stub: Stub) -> None:
    untagged = await push(prov, "plain")
    prod = await push(prov, "prod", tags={"env": "prod"})
    prod_eu = await push(prov, "prod-eu", tags={"env": "prod", "region": "eu"})
    terraform = await push(prov, "tf", provisioner="terraform")
    terraform_prod = await push(prov, "tf-prod", provisioner="terraform", tags={"env": "prod"})

    async def gets(metadata: Metadata, expected: str) -> None:
        job = await acquire(stub, metadata)
        assert job.job_id == expected, (metadata, job.job_id)

    # Nothing for a provisioner nobody pushed, whatever the tags.
    await gets(md("docker", ("docker",), env="prod", region="eu"), "")
    # A job with no tags goes to any daemon of its provisioner, even one with other tags.
    await gets(md("dev", env="dev"), untagged.job_id)
    # Tags not a subset: nothing (prod needs env=prod; the terraform ones are the wrong type).
    await gets(md("dev", env="dev"), "")
    await gets(md("bare"), "")
    # env=prod but region=us: prod (oldest fitting), then not prod-eu.
    await gets(md("us", env="prod", region="us"), prod.job_id)
    await gets(md("us", env="prod", region="us"), "")
    # A superset of the job's tags takes it.
    await gets(md("eu", env="prod", region="eu", gpu="yes"), prod_eu.job_id)
    # Several provisioners: repeated keys, or commas in one value.
    both = [
        ("provisioner-daemon-id", "multi"),
        ("provisioner-daemon-provisioner", "docker, terraform"),
    ]
    await gets(both, terraform.job_id)
    await gets(both, "")  # tf-prod needs env=prod
    await gets(md("multi-prod", ("echo", "terraform"), env="prod"), terraform_prod.job_id)
    assert (await get_job(prov, terraform_prod.job_id)).daemon_id == "multi-prod"
    listed = await prov.ListProvisionerJobs(pv.ListProvisionerJobsRequest(pending_only=True))
    assert list(listed.jobs) == []
    # A job that no daemon seen so far can take says why it waits.
    staging = await push(prov, "staging", tags={"env": "staging"})
    waiting = await get_job(prov, staging.job_id)
    assert waiting.status == Job.PENDING
    assert waiting.pending_reason == (
        "no connected daemon serves provisioner echo with tags {env=staging}"
    )
    assert (await acquire(stub, md("dev", env="dev"))).job_id == ""


async def test_tagged_build_follows_its_version_tags(prov: Prov, stub: Stub) -> None:
    daemon = md("gpu", gpu="a100")
    await import_template(prov, stub, "ml", metadata=daemon, tags={"gpu": "a100"})
    created = await create_workspace(prov, "w", "ann", "ml")
    assert (await acquire(stub, md("cpu"))).job_id == ""
    assert (await acquire(stub, md("other-gpu", gpu="h100"))).job_id == ""
    assert (await acquire(stub, daemon)).job_id == created.build.job_id


# -- 5. UpdateJob ----------------------------------------------------------------------


def log(
    output: str,
    stage: str = "Planning infrastructure",
    source: pd.LogSource.ValueType = pd.PROVISIONER,
    level: sdk.LogLevel.ValueType = sdk.INFO,
) -> pd.Log:
    return pd.Log(
        source=source, level=level, stage=stage, output=output, created_at=1_700_000_000_000
    )


async def test_update_job_ownership_errors(prov: Prov, stub: Stub) -> None:
    running = await push(prov, "a")
    pending = await push(prov, "b")
    await acquire_id(stub, md(), running.job_id)

    def make(job_id: str) -> pd.UpdateJobRequest:
        return pd.UpdateJobRequest(job_id=job_id)

    await ownership_errors(stub.UpdateJob, make, pending.job_id, running.job_id)
    await expect_exact(
        stub.UpdateJob(make(""), metadata=md()), Code.FAILED_PRECONDITION, "job job_id is required"
    )
    assert (await stub.UpdateJob(make(running.job_id), metadata=md())).canceled is False
    done = pd.CompletedJob(job_id=running.job_id, template_import=pd.CompletedJob.TemplateImport())
    await stub.CompleteJob(done, metadata=md())
    await expect_exact(
        stub.UpdateJob(make(running.job_id), metadata=md()),
        Code.FAILED_PRECONDITION,
        "job already completed",
    )


async def test_update_job_logs_are_what_watch_streams(prov: Prov, stub: Stub) -> None:
    version = await push(prov)
    await acquire_id(stub, md(), version.job_id)
    batches = [
        [log("Setting up", "Setting up", pd.PROVISIONER_DAEMON, sdk.INFO)],
        [
            log("plan: 1 to add"),
            log("deprecated attribute", level=sdk.WARN),
            log("debugging", level=sdk.DEBUG),
        ],
        [],  # a heartbeat only
        [log("no such host", "Starting workspace", pd.PROVISIONER, sdk.ERROR)],
    ]
    for batch in batches:
        answer = await stub.UpdateJob(
            pd.UpdateJobRequest(job_id=version.job_id, logs=batch), metadata=md()
        )
        assert answer.canceled is False
    done = pd.CompletedJob(job_id=version.job_id, template_import=pd.CompletedJob.TemplateImport())
    await stub.CompleteJob(done, metadata=md())
    logs, states = await watch(prov, version.job_id)
    assert logs == [line for batch in batches for line in batch]
    assert states[-1].status == Job.SUCCEEDED


async def test_update_job_stores_readme_and_answers_variables(prov: Prov, stub: Stub) -> None:
    version = await push(prov, variables={"b": "from-user"})
    await acquire_id(stub, md(), version.job_id)
    variables = [
        sdk.TemplateVariable(name="a", type="string", default_value="default-a"),
        sdk.TemplateVariable(name="b", type="string", required=True),
        sdk.TemplateVariable(name="c", type="number", default_value="3", sensitive=True),
    ]
    answer = await stub.UpdateJob(
        pd.UpdateJobRequest(
            job_id=version.job_id, readme=b"# Read me\n", template_variables=variables
        ),
        metadata=md(),
    )
    assert answer.canceled is False
    assert list(answer.variable_values) == [
        sdk.VariableValue(name="a", value="default-a"),
        sdk.VariableValue(name="b", value="from-user"),
        sdk.VariableValue(name="c", value="3", sensitive=True),
    ]
    stored = await get_version(prov, version.id)
    assert stored.readme == b"# Read me\n"
    assert list(stored.template_variables) == variables
    # A plain heartbeat does not clear what was found.
    await stub.UpdateJob(pd.UpdateJobRequest(job_id=version.job_id), metadata=md())
    stored = await get_version(prov, version.id)
    assert stored.readme == b"# Read me\n"
    assert list(stored.template_variables) == variables


async def test_missing_required_variables_fail_but_keep_logs(prov: Prov, stub: Stub) -> None:
    version = await push(prov, variables={"x": "given"})
    await acquire_id(stub, md(), version.job_id)
    variables = [
        sdk.TemplateVariable(name="x", type="string", required=True),
        sdk.TemplateVariable(name="b", type="string", required=True),
        sdk.TemplateVariable(name="y", type="string", default_value="dy"),
        sdk.TemplateVariable(name="a", type="string", required=True),
    ]
    lines = [log("Parsing template parameters", "Parsing template parameters")]
    await expect_exact(
        stub.UpdateJob(
            pd.UpdateJobRequest(job_id=version.job_id, logs=lines, template_variables=variables),
            metadata=md(),
        ),
        Code.FAILED_PRECONDITION,
        "required template variables need values: b, a",  # in declaration order
    )
    stored = await get_version(prov, version.id)
    assert list(stored.template_variables) == variables
    failed = pd.FailedJob(
        job_id=version.job_id,
        error="required template variables need values: b, a",
        error_code="REQUIRED_TEMPLATE_VARIABLES",
        template_import=pd.FailedJob.TemplateImport(),
    )
    await stub.FailJob(failed, metadata=md())
    logs, states = await watch(prov, version.job_id)
    assert logs == lines
    assert states[-1].status == Job.FAILED
    assert states[-1].error_code == "REQUIRED_TEMPLATE_VARIABLES"


async def test_update_job_reports_cancel(prov: Prov, stub: Stub) -> None:
    version = await push(prov)
    await acquire_id(stub, md(), version.job_id)
    request = pd.UpdateJobRequest(job_id=version.job_id)
    assert (await stub.UpdateJob(request, metadata=md())).canceled is False
    canceling = await prov.CancelProvisionerJob(pv.CancelProvisionerJobRequest(id=version.job_id))
    assert canceling.status == Job.CANCELING
    assert (await stub.UpdateJob(request, metadata=md())).canceled is True
    assert (await stub.UpdateJob(request, metadata=md())).canceled is True
    failed = pd.FailedJob(
        job_id=version.job_id, error="canceled", template_import=pd.FailedJob.TemplateImport()
    )
    await stub.FailJob(failed, metadata=md())
    assert (await get_job(prov, version.job_id)).status == Job.CANCELED


# -- 6. CompleteJob / FailJob ----------------------------------------------------------


async def test_complete_and_fail_ownership_and_payload_errors(prov: Prov, stub: Stub) -> None:
    running = await push(prov, "a")
    pending = await push(prov, "b")
    await acquire_id(stub, md(), running.job_id)

    def completed(job_id: str) -> pd.CompletedJob:
        return pd.CompletedJob(job_id=job_id, template_import=pd.CompletedJob.TemplateImport())

    def failed(job_id: str) -> pd.FailedJob:
        return pd.FailedJob(job_id=job_id, template_import=pd.FailedJob.TemplateImport())

    await ownership_errors(stub.CompleteJob, completed, pending.job_id, running.job_id)
    await ownership_errors(stub.FailJob, failed, pending.job_id, running.job_id)
    # CompleteJob needs its type (FailJob does not: see the untyped FailJob tests).
    await expect_exact(
        stub.CompleteJob(pd.CompletedJob(job_id=running.job_id), metadata=md()),
        Code.INVALID_ARGUMENT,
        "type payload must be provided",
    )
    mismatch = "type payload is workspace_build, but the job is a template_import"
    wrong = pd.CompletedJob(job_id=running.job_id, workspace_build=pd.CompletedJob.WorkspaceBuild())
    await expect_exact(stub.CompleteJob(wrong, metadata=md()), Code.INVALID_ARGUMENT, mismatch)
    wrong_fail = pd.FailedJob(
        job_id=running.job_id, error="x", workspace_build=pd.FailedJob.WorkspaceBuild()
    )
    await expect_exact(stub.FailJob(wrong_fail, metadata=md()), Code.INVALID_ARGUMENT, mismatch)
    assert (await get_job(prov, running.job_id)).status == Job.RUNNING
    await stub.CompleteJob(completed(running.job_id), metadata=md())
    again = "job already completed"
    await expect_exact(
        stub.CompleteJob(completed(running.job_id), metadata=md()), Code.FAILED_PRECONDITION, again
    )
    await expect_exact(
        stub.FailJob(failed(running.job_id), metadata=md()), Code.FAILED_PRECONDITION, again
    )
    assert (await get_job(prov, running.job_id)).status == Job.SUCCEEDED


async def test_import_completion_stores_findings_and_activates(prov: Prov, stub: Stub) -> None:
    first = await import_template(prov, stub, "t")
    version = await push(prov, "t")
    await acquire_id(stub, md(), version.job_id)
    templates = (await prov.ListTemplates(pv.ListTemplatesRequest())).templates
    assert [t.active_version_id for t in templates] == [first.id]  # not yet the new one
    start = [sdk.Resource(name="vm", type="echo_vm", daily_cost=3)]
    stop = [sdk.Resource(name="disk", type="echo_disk", daily_cost=1)]
    parameters = [
        sdk.RichParameter(
            name="size",
            type="string",
            default_value="s",
            options=[
                sdk.RichParameterOption(name="S", value="s"),
                sdk.RichParameterOption(name="L", value="l"),
            ],
        )
    ]
    done = pd.CompletedJob.TemplateImport(
        start_resources=start, stop_resources=stop, rich_parameters=parameters
    )
    await stub.CompleteJob(
        pd.CompletedJob(job_id=version.job_id, template_import=done), metadata=md()
    )
    stored = await get_version(prov, version.id)
    assert list(stored.start_resources) == start
    assert list(stored.stop_resources) == stop
    assert list(stored.rich_parameters) == parameters
    assert stored.job.status == Job.SUCCEEDED
    templates = (await prov.ListTemplates(pv.ListTemplatesRequest())).templates
    assert [t.active_version_id for t in templates] == [version.id]
    # A new workspace builds the active version, with its parameters checked.
    await expect_status(
        create_workspace(
            prov,
            "w",
            "u",
            "t",
            rich_parameter_values=[sdk.RichParameterValue(name="size", value="xl")],
        ),
        Code.INVALID_ARGUMENT,
        "is not one of s, l",
    )
    created = await create_workspace(prov, "w", "u", "t")
    assert created.build.template_version_id == version.id


async def test_failed_import_does_not_activate(prov: Prov, stub: Stub) -> None:
    version = await push(prov, "t")
    await acquire_id(stub, md(), version.job_id)
    failed = pd.FailedJob(
        job_id=version.job_id,
        error="parse: unexpected token",
        error_code="PARSE",
        template_import=pd.FailedJob.TemplateImport(),
    )
    await stub.FailJob(failed, metadata=md())
    job = await get_job(prov, version.job_id)
    assert (job.status, job.error, job.error_code) == (
        Job.FAILED,
        "parse: unexpected token",
        "PARSE",
    )
    templates = (await prov.ListTemplates(pv.ListTemplatesRequest())).templates
    assert [t.active_version_id for t in templates] == [""]
    await expect_status(
        create_workspace(prov, "w", "u", "t"), Code.FAILED_PRECONDITION, "no active version"
    )


async def test_build_state_flows_and_destroy_deletes(prov: Prov, stub: Stub) -> None:
    await import_template(prov, stub)
    daemon = md()
    created = await create_workspace(prov, "ws", "dora")
    resources = [sdk.Resource(name="vm", type="echo_vm")]
    job = await acquire_id(stub, daemon, created.build.job_id)
    await complete_build(stub, job.job_id, daemon, state=b"s1", resources=resources)

    # STOP fails with partial state: the next build gets it.
    stopped = await build(prov, "dora", "ws", sdk.STOP)
    job = await acquire_id(stub, daemon, stopped.build.job_id)
    assert job.workspace_build.state == b"s1"
    partial = pd.FailedJob(
        job_id=job.job_id,
        error="apply: timeout",
        error_code="APPLY",
        workspace_build=pd.FailedJob.WorkspaceBuild(state=b"s2-partial"),
    )
    await stub.FailJob(partial, metadata=daemon)
    shown = await get_job(prov, job.job_id)
    assert (shown.status, shown.error, shown.error_code) == (Job.FAILED, "apply: timeout", "APPLY")

    # A failure without state leaves the state as it was.
    started = await build(prov, "dora", "ws", sdk.START)
    job = await acquire_id(stub, daemon, started.build.job_id)
    assert job.workspace_build.state == b"s2-partial"
    no_state = pd.FailedJob(
        job_id=job.job_id, error="boom", workspace_build=pd.FailedJob.WorkspaceBuild()
    )
    await stub.FailJob(no_state, metadata=daemon)
    shown = await get_job(prov, job.job_id)
    assert (shown.status, shown.error, shown.error_code) == (Job.FAILED, "boom", "")

    # A failed DESTROY does not delete the workspace.
    destroy = await build(prov, "dora", "ws", sdk.DESTROY)
    job = await acquire_id(stub, daemon, destroy.build.job_id)
    assert job.workspace_build.state == b"s2-partial"
    assert job.workspace_build.metadata.workspace_transition == sdk.DESTROY
    failed_destroy = pd.FailedJob(
        job_id=job.job_id,
        error="destroy failed",
        workspace_build=pd.FailedJob.WorkspaceBuild(state=b"s3-partial"),
    )
    await stub.FailJob(failed_destroy, metadata=daemon)
    ref = pv.WorkspaceRef(id=created.workspace.id)
    shown_ws = await prov.GetWorkspace(pv.GetWorkspaceRequest(workspace=ref))
    assert shown_ws.workspace.deleted is False

    # A completed DESTROY does.
    destroy = await build(prov, "dora", "ws", sdk.DESTROY)
    job = await acquire_id(stub, daemon, destroy.build.job_id)
    assert job.workspace_build.state == b"s3-partial"
    await complete_build(stub, job.job_id, daemon, state=b"")
    shown_ws = await prov.GetWorkspace(pv.GetWorkspaceRequest(workspace=ref))
    assert shown_ws.workspace.deleted is True
    assert [b.build_number for b in shown_ws.builds] == [5, 4, 3, 2, 1]
    assert [b.state_size for b in shown_ws.builds] == [0, 10, 10, 10, 2]
    assert list(shown_ws.builds[-1].resources) == resources
    listed = await prov.ListWorkspaces(pv.ListWorkspacesRequest(owner="dora"))
    assert list(listed.workspaces) == []
    await expect_exact(build(prov, "dora", "ws", sdk.START), Code.NOT_FOUND, "workspace not found")


async def test_a_mixed_case_daemon_id_comes_back_exactly(prov: Prov, stub: Stub) -> None:
    daemon = md("Coder-Daemon-A")
    version = await push(prov, "My-Template")
    await acquire_id(stub, daemon, version.job_id)
    # Its own reports are its own (ownership by the id as it came).
    await stub.UpdateJob(pd.UpdateJobRequest(job_id=version.job_id), metadata=daemon)
    assert (await get_job(prov, version.job_id)).daemon_id == "Coder-Daemon-A"
    listed = (await prov.ListProvisionerDaemons(pv.ListProvisionerDaemonsRequest())).daemons
    assert [(d.id, d.current_job_id) for d in listed] == [("Coder-Daemon-A", version.job_id)]
    jobs = (await prov.ListProvisionerJobs(pv.ListProvisionerJobsRequest())).jobs
    assert [j.daemon_id for j in jobs] == ["Coder-Daemon-A"]
    _, states = await asyncio.gather(
        stub.CompleteJob(
            pd.CompletedJob(
                job_id=version.job_id, template_import=pd.CompletedJob.TemplateImport()
            ),
            metadata=daemon,
        ),
        watch(prov, version.job_id),
    )
    assert {s.daemon_id for s in states[1]} == {"Coder-Daemon-A"}
    assert (await get_version(prov, version.id)).job.daemon_id == "Coder-Daemon-A"
    # Names come back as they were given too.
    created = await create_workspace(prov, "My-Box", "Ann", "my-template")
    assert (created.workspace.name, created.workspace.owner) == ("My-Box", "Ann")
    assert created.workspace.template_name == "My-Template"
    templates = (await prov.ListTemplates(pv.ListTemplatesRequest())).templates
    assert [t.name for t in templates] == ["My-Template"]
    ref = pv.WorkspaceRef(owner="Ann", name="my-box")
    shown = await prov.GetWorkspace(pv.GetWorkspaceRequest(workspace=ref))
    assert shown.workspace.name == "My-Box"


REQUIRED = "required template variables need values: a"
REQUIRED_CODE = "REQUIRED_TEMPLATE_VARIABLES"


def untyped(job_id: str, error: str, code: str = "") -> pd.FailedJob:
    """A FailedJob as Coder's daemon sends for most failures: no type."""
    return pd.FailedJob(job_id=job_id, error=error, error_code=code)


def failure(job: Job) -> tuple[Any, str, str]:
    return job.status, job.error, job.error_code


async def test_untyped_fail_job_fails_an_import_at_once(prov: Prov, stub: Stub) -> None:
    version = await push(prov, "t")
    await acquire_id(stub, md(), version.job_id)
    variables = [sdk.TemplateVariable(name="a", type="string", required=True)]
    update = pd.UpdateJobRequest(job_id=version.job_id, template_variables=variables)
    await expect_exact(stub.UpdateJob(update, metadata=md()), Code.FAILED_PRECONDITION, REQUIRED)

    # A type that is not the job's is refused, and the job runs on.
    for wrong in (
        pd.FailedJob(job_id=version.job_id, workspace_build=pd.FailedJob.WorkspaceBuild()),
        pd.FailedJob(job_id=version.job_id, template_dry_run=pd.FailedJob.TemplateDryRun()),
    ):
        which = wrong.WhichOneof("type")
        await expect_exact(
            stub.FailJob(wrong, metadata=md()),
            Code.INVALID_ARGUMENT,
            f"type payload is {which}, but the job is a template_import",
        )
        assert (await get_job(prov, version.job_id)).status == Job.RUNNING

    await stub.FailJob(untyped(version.job_id, REQUIRED, REQUIRED_CODE), metadata=md())
    ended = (Job.FAILED, REQUIRED, REQUIRED_CODE)
    job = await get_job(prov, version.job_id)
    assert failure(job) == ended
    assert job.completed_at.ToMicroseconds() >= job.started_at.ToMicroseconds() > 0
    assert failure((await get_version(prov, version.id)).job) == ended
    listed = await prov.ListTemplateVersions(pv.ListTemplateVersionsRequest(template="t"))
    assert [failure(v.job) for v in listed.versions] == [ended]
    jobs = (await prov.ListProvisionerJobs(pv.ListProvisionerJobsRequest())).jobs
    assert [failure(j) for j in jobs if j.id == version.job_id] == [ended]
    _, states = await watch(prov, version.job_id)
    assert failure(states[-1]) == ended
    # Nothing of an import's is stored: the version is not activated.
    templates = (await prov.ListTemplates(pv.ListTemplatesRequest())).templates
    assert [t.active_version_id for t in templates] == [""]
    await expect_exact(
        stub.FailJob(untyped(version.job_id, "again"), metadata=md()),
        Code.FAILED_PRECONDITION,
        "job already completed",
    )
    assert failure(await get_job(prov, version.job_id)) == ended


async def test_untyped_fail_job_fails_a_dry_run_at_once(prov: Prov, stub: Stub) -> None:
    version = await import_template(prov, stub, "t")
    dry = await prov.DryRun(pv.DryRunRequest(version=version.id, owner="bob", workspace_name="x"))
    await acquire_id(stub, md(), dry.id)
    wrong = pd.FailedJob(job_id=dry.id, template_import=pd.FailedJob.TemplateImport())
    await expect_exact(
        stub.FailJob(wrong, metadata=md()),
        Code.INVALID_ARGUMENT,
        "type payload is template_import, but the job is a template_dry_run",
    )
    assert (await get_job(prov, dry.id)).status == Job.RUNNING
    await stub.FailJob(untyped(dry.id, "plan: no such provider", "PLAN"), metadata=md())
    job = await get_job(prov, dry.id)
    assert failure(job) == (Job.FAILED, "plan: no such provider", "PLAN")
    assert list(job.dry_run_resources) == []
    # The daemon may send no error at all (a graceful shutdown): still failed at once.
    dry = await prov.DryRun(pv.DryRunRequest(version=version.id, owner="bob", workspace_name="x"))
    await acquire_id(stub, md(), dry.id)
    await stub.FailJob(pd.FailedJob(job_id=dry.id), metadata=md())
    assert (await get_job(prov, dry.id)).status == Job.FAILED


async def test_untyped_fail_job_fails_a_build_and_keeps_its_state(prov: Prov, stub: Stub) -> None:
    await import_template(prov, stub)
    daemon = md()
    created = await create_workspace(prov, "ws", "dora")
    job = await acquire_id(stub, daemon, created.build.job_id)
    await complete_build(stub, job.job_id, daemon, state=b"s1")

    stopped = await build(prov, "dora", "ws", sdk.STOP)
    job = await acquire_id(stub, daemon, stopped.build.job_id)
    wrong = pd.FailedJob(job_id=job.job_id, template_import=pd.FailedJob.TemplateImport())
    await expect_exact(
        stub.FailJob(wrong, metadata=daemon),
        Code.INVALID_ARGUMENT,
        "type payload is template_import, but the job is a workspace_build",
    )
    assert (await get_job(prov, job.job_id)).status == Job.RUNNING
    await stub.FailJob(untyped(job.job_id, "connection lost", "TRANSPORT"), metadata=daemon)
    ended = (Job.FAILED, "connection lost", "TRANSPORT")
    assert failure(await get_job(prov, job.job_id)) == ended
    ref = pv.WorkspaceRef(id=created.workspace.id)
    shown = await prov.GetWorkspace(pv.GetWorkspaceRequest(workspace=ref))
    assert failure(shown.workspace.latest_build.job) == ended
    assert [failure(b.job)[0] for b in shown.builds] == [Job.FAILED, Job.SUCCEEDED]
    assert failure(shown.builds[0].job) == ended
    # Nothing was stored for it: the build keeps the state it started from.
    assert [b.state_size for b in shown.builds] == [2, 2]

    # The workspace takes its next build, which starts from that state.
    started = await build(prov, "dora", "ws", sdk.START)
    job = await acquire_id(stub, daemon, started.build.job_id)
    assert job.workspace_build.state == b"s1"
    await stub.FailJob(untyped(job.job_id, "canceled"), metadata=daemon)

    # An untyped failed DESTROY does not delete the workspace.
    destroy = await build(prov, "dora", "ws", sdk.DESTROY)
    job = await acquire_id(stub, daemon, destroy.build.job_id)
    assert job.workspace_build.state == b"s1"
    await stub.FailJob(untyped(job.job_id, "destroy: timeout"), metadata=daemon)
    shown = await prov.GetWorkspace(pv.GetWorkspaceRequest(workspace=ref))
    assert shown.workspace.deleted is False
    assert failure(shown.workspace.latest_build.job) == (Job.FAILED, "destroy: timeout", "")


# -- 7. CommitQuota --------------------------------------------------------------------


def quota(job_id: str, cost: int) -> pd.CommitQuotaRequest:
    return pd.CommitQuotaRequest(job_id=job_id, daily_cost=cost)


async def consumed(prov: Prov, user: str) -> int:
    return int((await prov.GetQuota(pv.GetQuotaRequest(user=user))).consumed)


async def test_commit_quota_without_quota_is_unlimited(prov: Prov, stub: Stub) -> None:
    await import_template(prov, stub)
    created = await create_workspace(prov, "w", "carol")
    job = await acquire_id(stub, md(), created.build.job_id)
    answer = await stub.CommitQuota(quota(job.job_id, 1000), metadata=md())
    assert (answer.ok, answer.budget, answer.credits_consumed) == (True, -1, 1000)
    # Committing again replaces this build's cost, it does not add to it.
    answer = await stub.CommitQuota(quota(job.job_id, 400), metadata=md())
    assert (answer.ok, answer.budget, answer.credits_consumed) == (True, -1, 400)
    await complete_build(stub, job.job_id, md())
    assert await consumed(prov, "carol") == 400


async def test_commit_quota_with_allowance(prov: Prov, stub: Stub) -> None:
    await import_template(prov, stub)
    daemon = md()
    await prov.SetQuota(pv.SetQuotaRequest(user="bob", allowance=10))
    first = await create_workspace(prov, "a", "bob")
    job = await acquire_id(stub, daemon, first.build.job_id)
    answer = await stub.CommitQuota(quota(job.job_id, 7), metadata=daemon)
    assert (answer.ok, answer.credits_consumed, answer.budget) == (True, 7, 10)
    await complete_build(stub, job.job_id, daemon)
    assert await consumed(prov, "bob") == 7

    # 7 + 5 > 10 and the cost goes up (no previous build): denied, nothing recorded.
    second = await create_workspace(prov, "b", "bob")
    job_b = await acquire_id(stub, daemon, second.build.job_id)
    answer = await stub.CommitQuota(quota(job_b.job_id, 5), metadata=daemon)
    assert (answer.ok, answer.credits_consumed, answer.budget) == (False, 7, 10)
    assert await consumed(prov, "bob") == 7
    answer = await stub.CommitQuota(quota(job_b.job_id, 3), metadata=daemon)
    assert (answer.ok, answer.credits_consumed, answer.budget) == (True, 10, 10)
    assert await consumed(prov, "bob") == 10
    await complete_build(stub, job_b.job_id, daemon)

    # Over the allowance now; a rebuild of "a" that costs more is denied...
    await prov.SetQuota(pv.SetQuotaRequest(user="bob", allowance=1))
    again = await build(prov, "bob", "a", sdk.START)
    job_a = await acquire_id(stub, daemon, again.build.job_id)
    answer = await stub.CommitQuota(quota(job_a.job_id, 8), metadata=daemon)
    assert (answer.ok, answer.credits_consumed, answer.budget) == (False, 3, 1)
    # ...one whose cost goes down passes even over the allowance.
    answer = await stub.CommitQuota(quota(job_a.job_id, 6), metadata=daemon)
    assert (answer.ok, answer.credits_consumed, answer.budget) == (True, 9, 1)
    await complete_build(stub, job_a.job_id, daemon)
    assert await consumed(prov, "bob") == 9
    # Another owner's quota is not touched by bob's builds.
    assert await consumed(prov, "carol") == 0


async def test_commit_quota_errors(prov: Prov, stub: Stub) -> None:
    version = await import_template(prov, stub)
    running = await create_workspace(prov, "r", "erin")
    pending = await create_workspace(prov, "p", "erin")
    await acquire_id(stub, md(), running.build.job_id)

    def make(job_id: str) -> pd.CommitQuotaRequest:
        return quota(job_id, 1)

    await ownership_errors(stub.CommitQuota, make, pending.build.job_id, running.build.job_id)
    await expect_exact(
        stub.CommitQuota(quota(running.build.job_id, -1), metadata=md()),
        Code.INVALID_ARGUMENT,
        "daily_cost must be 0 or more",
    )
    await complete_build(stub, running.build.job_id, md())
    await expect_exact(
        stub.CommitQuota(make(running.build.job_id), metadata=md()),
        Code.FAILED_PRECONDITION,
        "job already completed",
    )
    await acquire_id(stub, md(), pending.build.job_id)
    await complete_build(stub, pending.build.job_id, md())
    # Not a build: an import and a dry run.
    other = await push(prov)
    await acquire_id(stub, md(), other.job_id)
    not_build = "quota is committed for workspace builds only"
    await expect_exact(
        stub.CommitQuota(make(other.job_id), metadata=md()), Code.FAILED_PRECONDITION, not_build
    )
    dry = await prov.DryRun(pv.DryRunRequest(version=version.id, owner="erin"))
    await acquire_id(stub, md("d2"), dry.id)
    await expect_exact(
        stub.CommitQuota(make(dry.id), metadata=md("d2")), Code.FAILED_PRECONDITION, not_build
    )
    assert await consumed(prov, "erin") == 0


# -- 8. the hang rule ------------------------------------------------------------------


@pytest.mark.parametrize("timeouts", [HANG_TIMEOUTS], indirect=True, ids=["hang1s"])
async def test_silent_job_fails_as_hung(prov: Prov, stub: Stub) -> None:
    version = await push(prov)
    await acquire_id(stub, md("quiet"), version.job_id)
    job = await wait_provisioner_job(prov, version.job_id, timeout=60)
    assert job.status == Job.FAILED
    assert "no update" in job.error and "hung" in job.error, job.error
    assert "quiet" in job.error
    assert job.error_code == "HUNG"
    logs, states = await watch(prov, version.job_id)
    assert states[-1].status == Job.FAILED
    why = [line for line in logs if line.source == pd.PROVISIONER_DAEMON]
    assert len(why) == 1, logs
    assert "no update from provisioner daemon quiet" in why[0].output
    assert "hung" in why[0].output
    assert why[0].level == sdk.ERROR
    # The daemon comes back too late.
    await expect_exact(
        stub.UpdateJob(pd.UpdateJobRequest(job_id=version.job_id), metadata=md("quiet")),
        Code.FAILED_PRECONDITION,
        "job already completed",
    )


@pytest.mark.parametrize("timeouts", [KEEPALIVE_TIMEOUTS], indirect=True, ids=["hang2s"])
async def test_updates_keep_a_job_alive_past_the_hang_timeout(prov: Prov, stub: Stub) -> None:
    version = await push(prov)
    await acquire_id(stub, md(), version.job_id)
    request = pd.UpdateJobRequest(job_id=version.job_id)
    loop = asyncio.get_running_loop()
    until = loop.time() + 3 * KEEPALIVE_TIMEOUTS.provisioner_hang
    while loop.time() < until:
        await stub.UpdateJob(request, metadata=md())
        await asyncio.sleep(0.3)
    assert (await get_job(prov, version.job_id)).status == Job.RUNNING
    done = pd.CompletedJob(job_id=version.job_id, template_import=pd.CompletedJob.TemplateImport())
    await stub.CompleteJob(done, metadata=md())
    job = await get_job(prov, version.job_id)
    assert (job.status, job.error) == (Job.SUCCEEDED, "")


# -- 9. reconnecting -------------------------------------------------------------------


async def test_reconnect_with_same_id_keeps_ownership(
    server: RunningServer, token: str, prov: Prov
) -> None:
    version = await push(prov)
    async with Connection(server.address, token).aio_channel() as first:
        job = await acquire(pd_grpc.ProvisionerDaemonStub(first), md("roamer"))
        assert job.job_id == version.job_id
    async with Connection(server.address, token).aio_channel() as second:
        stub = pd_grpc.ProvisionerDaemonStub(second)
        lines = [log("after the reconnect")]
        request = pd.UpdateJobRequest(job_id=job.job_id, logs=lines)
        assert (await stub.UpdateJob(request, metadata=md("roamer"))).canceled is False
        await expect_exact(
            stub.UpdateJob(request, metadata=md("someone-else")),
            Code.PERMISSION_DENIED,
            "you don't own this job",
        )
        done = pd.CompletedJob(job_id=job.job_id, template_import=pd.CompletedJob.TemplateImport())
        await stub.CompleteJob(done, metadata=md("roamer"))
    logs, states = await watch(prov, job.job_id)
    assert logs == lines
    assert (states[-1].status, states[-1].daemon_id) == (Job.SUCCEEDED, "roamer")


# -- 10. many daemons, many jobs, each exactly once ------------------------------------


SCALE_JOBS = 500
SCALE_DAEMONS = 10


class ScaleDaemon:
    """A raw daemon for the scale test: AcquireJobWithCancel, CompleteJob, repeat,
    until `stop` is set (then it cancels its acquire). INTERNAL answers are retried, as a
    real daemon retries, and counted (there must be none)."""

    def __init__(self, stub: Stub, daemon_id: str, stop: asyncio.Event) -> None:
        self.stub = stub
        self.id = daemon_id
        self.metadata = md(daemon_id)
        self.stop = stop
        self.taken: list[str] = []
        self.internal_errors = 0

    async def acquire(self) -> tuple[pd.AcquiredJob | None, bool]:
        """One AcquireJobWithCancel: (the job, or None on INTERNAL; whether we cancelled)."""
        async with AcquireCall(self.stub, self.metadata) as call:
            reading = asyncio.ensure_future(call.read())
            stopping = asyncio.ensure_future(self.stop.wait())
            try:
                await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
                cancelled = not reading.done()
                if cancelled:
                    call.cancel_acquire()
                job = await bounded(reading, 120)
            except aio.AioRpcError as exc:
                assert exc.code() == Code.INTERNAL, exc
                self.internal_errors += 1
                return None, False
            finally:
                stopping.cancel()
            assert isinstance(job, pd.AcquiredJob), job
            await call.end()  # exactly one message
            return job, cancelled

    async def complete(self, job_id: str) -> None:
        completed = pd.CompletedJob(job_id=job_id, template_import=pd.CompletedJob.TemplateImport())
        while True:
            try:
                await self.stub.CompleteJob(completed, metadata=self.metadata, timeout=120)
                return
            except aio.AioRpcError as exc:
                assert exc.code() == Code.INTERNAL, exc
                self.internal_errors += 1

    async def run(self, received: dict[str, list[str]], total: int) -> None:
        while True:
            job, cancelled = await self.acquire()
            if job is None:
                continue
            if job.job_id:
                received[job.job_id].append(self.id)
                self.taken.append(job.job_id)
                await self.complete(job.job_id)
                if len(received) >= total:
                    self.stop.set()
            else:
                assert cancelled, "an empty job although the daemon did not cancel"
            if cancelled or self.stop.is_set():
                return


@pytest.mark.timeout(600)
async def test_many_daemons_take_every_job_exactly_once(
    backend_url: str, prov: Prov, stub: Stub
) -> None:
    received: dict[str, list[str]] = defaultdict(list)
    all_done = asyncio.Event()
    pushing = asyncio.Semaphore(16)

    async def push_one(i: int) -> str:
        async with pushing:
            return (await push(prov, f"scale-{i}")).job_id

    workers = [ScaleDaemon(stub, f"scale-daemon-{n}", all_done) for n in range(SCALE_DAEMONS)]
    daemons = [asyncio.ensure_future(w.run(received, SCALE_JOBS)) for w in workers]
    try:
        job_ids = await bounded(asyncio.gather(*(push_one(i) for i in range(SCALE_JOBS))), 400)
        await bounded(all_done.wait(), 300)
        await bounded(asyncio.gather(*daemons), 120)
    finally:
        for task in daemons:
            task.cancel()
    assert len(set(job_ids)) == SCALE_JOBS
    assert set(received) == set(job_ids)
    twice = {j: d for j, d in received.items() if len(d) != 1}
    assert twice == {}
    assert sum(len(w.taken) for w in workers) == SCALE_JOBS
    assert sum(w.internal_errors for w in workers) == 0
    listed = await prov.ListProvisionerJobs(pv.ListProvisionerJobsRequest(limit=SCALE_JOBS + 10))
    assert len(listed.jobs) == SCALE_JOBS
    assert {j.status for j in listed.jobs} == {Job.SUCCEEDED}
    assert {j.id: j.daemon_id for j in listed.jobs} == {j: d[0] for j, d in received.items()}


# -- 11. payloads over the message limit -----------------------------------------------


@pytest.mark.timeout(300)
async def test_payload_over_4_mib_fails_the_job(prov: Prov, stub: Stub) -> None:
    # The biggest archive PushTemplate takes (1 MiB) plus a big state from the last build.
    noise = random.Random(7).randbytes(1_000_000)
    archive = tar({"blob.bin": noise})
    assert len(archive) <= 1 << 20
    await import_template(prov, stub, archive=archive)
    created = await create_workspace(prov, "big", "fay")
    first = await acquire_id(stub, md(), created.build.job_id)
    assert first.template_source_archive == archive
    state = random.Random(8).randbytes(3_400_000)
    await complete_build(stub, first.job_id, md(), state=state)
    stopped = await build(prov, "fay", "big", sdk.STOP)
    # The job cannot be sent: the daemon gets nothing, the job fails saying why.
    assert (await acquire(stub, md())).job_id == ""
    job = await get_job(prov, stopped.build.job_id)
    assert job.status == Job.FAILED
    assert "more than the 4 MiB message limit" in job.error, job.error
    assert job.error.startswith("the job's payload is ")
    # Smaller jobs behind it still flow.
    small = await push(prov, "small")
    assert (await acquire(stub, md())).job_id == small.job_id


# -- 12. authentication ----------------------------------------------------------------


@contextlib.asynccontextmanager
async def unauthenticated(server: RunningServer) -> AsyncIterator[Stub]:
    async with aio.insecure_channel(server.address) as channel:
        yield pd_grpc.ProvisionerDaemonStub(channel)


async def test_every_rpc_needs_a_token(server: RunningServer, prov: Prov, stub: Stub) -> None:
    version = await push(prov)
    await acquire_id(stub, md(), version.job_id)
    job_id = version.job_id
    missing = "Authorization token is not supplied"
    async with unauthenticated(server) as anon:
        calls: list[Awaitable[Any]] = [
            anon.AcquireJob(pd.Empty(), metadata=md()),
            anon.UpdateJob(pd.UpdateJobRequest(job_id=job_id), metadata=md()),
            anon.CommitQuota(pd.CommitQuotaRequest(job_id=job_id, daily_cost=1), metadata=md()),
            anon.FailJob(
                pd.FailedJob(job_id=job_id, template_import=pd.FailedJob.TemplateImport()),
                metadata=md(),
            ),
            anon.CompleteJob(
                pd.CompletedJob(job_id=job_id, template_import=pd.CompletedJob.TemplateImport()),
                metadata=md(),
            ),
        ]
        for call in calls:
            await expect_exact(call, Code.UNAUTHENTICATED, missing)
        await expect_acquire_call_status(anon, md(), missing, Code.UNAUTHENTICATED)
        bad = [*md(), ("authorization", "not-a-token")]
        await expect_status(
            anon.AcquireJob(pd.Empty(), metadata=bad),
            Code.UNAUTHENTICATED,
            "invalid authentication token",
        )
    # Nothing those calls said was taken into account.
    job = await get_job(prov, job_id)
    assert (job.status, job.daemon_id) == (Job.RUNNING, "d1")


# -- concurrent acquires: on PostgreSQL, group commits race for row locks ----------------
# (database.py retries a transaction that loses a deadlock; none may surface as INTERNAL)

CHURN_TIMEOUTS = Timeouts(poll=0.05, provisioner_hang=120.0, acquire_long_poll=0.5)


@pytest.mark.timeout(300)
@pytest.mark.parametrize("timeouts", [CHURN_TIMEOUTS], indirect=True, ids=["poll50ms"])
async def test_concurrent_acquires_never_fail_internally(
    request: pytest.FixtureRequest, backend_url: str, prov: Prov, stub: Stub
) -> None:
    """40 daemons acquiring and completing while 8 clients push, until the first error
    or the time budget (one writer on SQLite: a short budget is enough there)."""
    postgres = backend_url.startswith("postgresql")
    budget = 60.0 if postgres else 10.0
    errors: list[str] = []
    finished = asyncio.Event()
    started = time.monotonic()

    async def daemon(n: int) -> None:
        metadata = md(f"churn-{n}")
        while not finished.is_set():
            try:
                job = await acquire(stub, metadata)
                if job.job_id:
                    completed = pd.CompletedJob(
                        job_id=job.job_id, template_import=pd.CompletedJob.TemplateImport()
                    )
                    await stub.CompleteJob(completed, metadata=metadata, timeout=STEP)
            except aio.AioRpcError as exc:
                errors.append(f"{exc.code().name}: {exc.details()}")
                finished.set()

    async def pusher(n: int) -> None:
        for i in itertools.count():
            if finished.is_set() or time.monotonic() - started > budget:
                finished.set()
                return
            await push(prov, f"churn-{n}-{i}")

    daemons = [asyncio.ensure_future(daemon(n)) for n in range(40)]
    pushers = [asyncio.ensure_future(pusher(n)) for n in range(8)]
    try:
        await bounded(finished.wait(), budget + 60)
        await bounded(asyncio.gather(*daemons, *pushers), 60)
    finally:
        for task in (*daemons, *pushers):
            task.cancel()
    assert errors == []
