"""Jobs over gRPC: queue, assign, ack, complete, cancel, watch (docs/protocols.md, sections 2-3)."""

from __future__ import annotations

import asyncio
import re
from typing import Any

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty
from grpc import StatusCode, aio

from waystation import testing as t
from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.waystation.v1 import admin_pb2 as admin_pb
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc
from waystation.server.app import RunningServer

FP = StatusCode.FAILED_PRECONDITION
ULID = re.compile(r"^[0-9A-HJKMNP-TV-Z]{26}$")
Job = vs.Job


async def queue(vagrant: vs_grpc.VagrantAsyncStub, job: vs.Job, expires_in: str = "") -> str:
    resp = await vagrant.QueueJob(vs.QueueJobRequest(job=job, expires_in=expires_in))
    return resp.job_id


async def runner(channel: aio.Channel, runner_id: str, by_id_only: bool = False) -> t.FakeRunner:
    fake = t.FakeRunner(channel, runner_id, by_id_only)
    await fake.register()
    return fake


# -- queue -------------------------------------------------------------------------


async def test_queue_makes_a_queued_job_with_a_ulid(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    sent = t.noop_job(labels={"team": "infra"})
    sent.state = Job.SUCCESS  # server-side fields from the client are ignored
    sent.queue_time.FromSeconds(1)
    job_id = await queue(vagrant, sent, expires_in="1h")
    assert ULID.match(job_id)
    job = await vagrant.GetJob(vs.GetJobRequest(job_id=job_id))
    assert job.id == job_id
    assert job.state == Job.QUEUED
    assert job.labels["team"] == "infra"
    assert job.queue_time.seconds > 1_000_000_000
    assert job.expire_time.ToMicroseconds() - job.queue_time.ToMicroseconds() == 3600 * 10**6
    assert job.WhichOneof("operation") == "noop"


@pytest.mark.parametrize(
    ("request_", "fragment"),
    [
        (vs.QueueJobRequest(), "job is required"),
        (vs.QueueJobRequest(job=t.noop_job(id="mine")), "job id must be empty"),
        (vs.QueueJobRequest(job=vs.Job(noop=vs.Job.Noop())), "job target_runner is required"),
        (
            vs.QueueJobRequest(job=vs.Job(target_runner=vs.Ref.Runner(any=vs.Ref.RunnerAny()))),
            "job operation is required",
        ),
        (vs.QueueJobRequest(job=t.noop_job(), expires_in="5 minutes"), "Invalid expiry duration"),
        (vs.QueueJobRequest(job=t.noop_job(), expires_in="-5m"), "Invalid expiry duration"),
        (
            vs.QueueJobRequest(job=t.noop_job(target=sdk.Ref.Target(resource_id="01GHOST"))),
            "job scope does not exist",
        ),
    ],
)
async def test_queue_rejects_bad_jobs_and_stores_nothing(
    vagrant: vs_grpc.VagrantAsyncStub, request_: vs.QueueJobRequest, fragment: str
) -> None:
    await t.expect_status(vagrant.QueueJob(request_), FP, fragment)
    assert not (await vagrant._ListJobs(vs.ListJobsRequest())).jobs


async def test_git_path_escaping_the_repository_is_invalid(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    source = vs.Job.DataSource(git=vs.Job.Git(url="https://x/r.git", path="../etc"))
    await t.expect_status(
        vagrant.QueueJob(vs.QueueJobRequest(job=t.noop_job(data_source=source))),
        StatusCode.INVALID_ARGUMENT,
        "stay inside the repository",
    )


async def test_get_missing_job_is_not_found(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    await t.expect_status(
        vagrant.GetJob(vs.GetJobRequest(job_id="01NOPE")), StatusCode.NOT_FOUND, "job not found"
    )


async def test_list_jobs_in_id_order(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    ids = [await queue(vagrant, t.noop_job()) for _ in range(5)]
    listed = (await vagrant._ListJobs(vs.ListJobsRequest())).jobs
    assert [j.id for j in listed] == sorted(ids)


async def test_queue_takes_the_projects_data_source(vagrant: vs_grpc.VagrantAsyncStub) -> None:
    basis = (await vagrant.UpsertBasis(vs.UpsertBasisRequest(basis=t.basis()))).basis
    source = vs.Job.DataSource(git=vs.Job.Git(url="https://example.com/app.git", ref="main"))
    project = t.project(t.basis_ref(basis), data_source=source)
    project = (await vagrant.UpsertProject(vs.UpsertProjectRequest(project=project))).project
    job_id = await queue(
        vagrant, t.noop_job(project=sdk.Ref.Project(resource_id=project.resource_id))
    )
    job = await vagrant.GetJob(vs.GetJobRequest(job_id=job_id))
    assert job.data_source == source


# -- validate ----------------------------------------------------------------------


async def test_validate_job(vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel) -> None:
    bad = await vagrant.ValidateJob(vs.ValidateJobRequest(job=vs.Job(noop=vs.Job.Noop())))
    assert not bad.valid and not bad.assignable
    assert bad.validation_error.code == 9  # FAILED_PRECONDITION
    assert "target_runner" in bad.validation_error.message
    good = await vagrant.ValidateJob(vs.ValidateJobRequest(job=t.noop_job()))
    assert good.valid and not good.assignable  # no runner yet
    fake = await runner(channel, "r1", by_id_only=True)
    try:
        anyone = await vagrant.ValidateJob(vs.ValidateJobRequest(job=t.noop_job()))
        assert not anyone.assignable  # the only runner takes jobs by id only
        mine = await vagrant.ValidateJob(vs.ValidateJobRequest(job=t.noop_job("R1")))
        assert mine.valid and mine.assignable
        skip = await vagrant.ValidateJob(
            vs.ValidateJobRequest(job=t.noop_job("r1"), disable_assign=True)
        )
        assert skip.valid and not skip.assignable
    finally:
        await fake.close()


# -- the runner protocol ---------------------------------------------------------


async def test_a_job_runs_end_to_end(
    vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    fake = await runner(channel, "runner-1")
    try:
        job_id = await queue(vagrant, t.noop_job())
        stream = fake.job_stream()
        job = await stream.take()
        assert job.id == job_id
        running = await t.wait_for_state(vagrant, job_id, Job.RUNNING)
        assert running.assigned_runner.id == "runner-1"
        assert running.HasField("ack_time") and running.HasField("assign_time")
        await stream.output("hello", "world")
        await stream.heartbeat()
        result = vs.Job.Result(run=vs.Job.CommandResult(exit_code=0, run_result=True))
        await stream.complete(result)
        done = await t.wait_for_state(vagrant, job_id, Job.SUCCESS)
        assert done.result == result
        assert done.HasField("complete_time")
        events = await t.watch(vagrant, job_id)
        assert t.terminal_lines(events) == ["hello", "world"]
    finally:
        await fake.close()


async def test_job_stream_first_message_must_be_request(channel: aio.Channel) -> None:
    fake = await runner(channel, "r")
    try:
        stream = fake.job_stream()
        await stream.send(ack=vs.RunnerJobStreamRequest.Ack())
        await t.expect_status(stream.read(), FP, "first message must be a Request event")
    finally:
        await fake.close()


async def test_unknown_runner_is_not_found(channel: aio.Channel) -> None:
    stream = t.FakeRunner(channel, "never-registered").job_stream()
    await stream.request()
    await t.expect_status(stream.read(), StatusCode.NOT_FOUND, "runner ID not found")


async def test_runner_config_first_message_must_be_open(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    async def requests() -> object:
        yield vs.RunnerConfigRequest()

    call = vagrant.RunnerConfig(requests())  # type: ignore[arg-type]
    await t.expect_status(call.read(), FP, "first message must be an Open event")


async def test_assignment_by_id_ignores_case_and_by_id_only_skips_any(
    vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    picky = await runner(channel, "Picky", by_id_only=True)
    try:
        anyone = await queue(vagrant, t.noop_job())
        mine = await queue(vagrant, t.noop_job("PICKY"))
        job = await picky.job_stream().take()
        assert job.id == mine  # the older any-job is not for a by_id_only runner
        still = await vagrant.GetJob(vs.GetJobRequest(job_id=anyone))
        assert still.state == Job.QUEUED
    finally:
        await picky.close()


async def test_runner_ids_go_back_exactly_as_the_runner_registered_them(
    vagrant: vs_grpc.VagrantAsyncStub, admin: admin_grpc.AdminAsyncStub, channel: aio.Channel
) -> None:
    registered = "WSCheck-Runner-1"
    fake = await runner(channel, registered, by_id_only=True)
    try:
        for asked in (registered, registered.lower(), registered.upper()):
            found = await vagrant.GetRunner(vs.GetRunnerRequest(runner_id=asked))
            assert found.id == registered
        listed = await admin.ListRunners(admin_pb.ListRunnersRequest())
        assert [r.runner.id for r in listed.runners] == [registered]

        # Queued first, then assigned by the runner's own look; the stream may
        # name the runner in any case.
        first = await queue(vagrant, t.noop_job(registered.upper()))
        stream = t.JobStream(fake.stub, registered.lower())
        job = await stream.take()
        assert (job.id, job.assigned_runner.id) == (first, registered)
        await stream.complete()
        # Queued while the runner waits: handed to it in the queue's transaction.
        stream = fake.job_stream()
        await stream.request()
        second = await queue(vagrant, t.noop_job("wscheck-RUNNER-1"))
        job = await stream.assignment()
        assert (job.id, job.assigned_runner.id) == (second, registered)
        await stream.send(ack=stream.Req.Ack())
        await stream.complete()

        for job_id, target in ((first, registered.upper()), (second, "wscheck-RUNNER-1")):
            got = await t.wait_for_state(vagrant, job_id, Job.SUCCESS)
            assert got.assigned_runner.id == registered
            assert got.target_runner.id.id == target  # as it was queued
            events = await t.watch(vagrant, job_id)
            states = [e.state for e in events if e.WhichOneof("event") == "state"]
            assert states and states[-1].job.assigned_runner.id == registered
        jobs = (await vagrant._ListJobs(vs.ListJobsRequest())).jobs
        assert [j.assigned_runner.id for j in jobs] == [registered, registered]
    finally:
        await fake.close()


async def test_oldest_job_first(vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel) -> None:
    ids = [await queue(vagrant, t.noop_job()) for _ in range(3)]
    fake = await runner(channel, "r")
    try:
        got = []
        for _ in ids:
            stream = fake.job_stream()
            got.append((await stream.take()).id)
            await stream.complete()
        assert got == ids
    finally:
        await fake.close()


async def test_error_instead_of_ack_requeues_at_once(
    vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    fake = await runner(channel, "r")
    try:
        job_id = await queue(vagrant, t.noop_job())
        stream = fake.job_stream()
        await stream.request()
        assert (await stream.assignment()).id == job_id
        await stream.fail("not now")
        job = await t.wait_for_state(vagrant, job_id, Job.QUEUED)
        assert not job.HasField("assign_time") and not job.assigned_runner.id
        again = fake.job_stream()
        assert (await again.take()).id == job_id
    finally:
        await fake.close()


async def test_anything_but_ack_is_a_nack_and_an_error(
    vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    fake = await runner(channel, "r")
    try:
        job_id = await queue(vagrant, t.noop_job())
        stream = fake.job_stream()
        await stream.request()
        await stream.assignment()
        await stream.heartbeat()
        await t.expect_status(stream.read(), FP, "ack expected, got: heartbeat")
        await t.wait_for_state(vagrant, job_id, Job.QUEUED)
    finally:
        await fake.close()


async def test_disconnect_before_ack_requeues_at_once(
    vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    fake = await runner(channel, "r")
    try:
        job_id = await queue(vagrant, t.noop_job())
        stream = fake.job_stream()
        await stream.request()
        await stream.assignment()
        stream.cancel()
        await t.wait_for_state(vagrant, job_id, Job.QUEUED)
    finally:
        await fake.close()


async def test_runner_error_ends_the_job_as_error(
    vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    fake = await runner(channel, "r")
    try:
        job_id = await queue(vagrant, t.noop_job())
        stream = fake.job_stream()
        await stream.take()
        await stream.output("about to fail")
        await stream.fail("disk full", code=13)
        job = await t.wait_for_state(vagrant, job_id, Job.ERROR)
        assert (job.error.code, job.error.message) == (13, "disk full")
        events = await t.watch(vagrant, job_id)
        assert t.terminal_lines(events) == ["about to fail"]
        assert events[-1].complete.error.message == "disk full"
    finally:
        await fake.close()


async def test_get_runner(vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel) -> None:
    await t.expect_status(
        vagrant.GetRunner(vs.GetRunnerRequest(runner_id="nobody")),
        StatusCode.NOT_FOUND,
        "runner ID not found",
    )
    fake = await runner(channel, "Runner-A", by_id_only=True)
    try:
        got = await vagrant.GetRunner(vs.GetRunnerRequest(runner_id="runner-a"))
        assert got.id == "Runner-A" and got.by_id_only
    finally:
        await fake.close()


# -- cancel ------------------------------------------------------------------------


async def test_cancel_in_every_state(
    vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    await t.expect_status(
        vagrant.CancelJob(vs.CancelJobRequest(job_id="01NOPE")), StatusCode.NOT_FOUND
    )
    # QUEUED: ends at once.
    queued = await queue(vagrant, t.noop_job("nobody"))
    await vagrant.CancelJob(vs.CancelJobRequest(job_id=queued))
    job = await vagrant.GetJob(vs.GetJobRequest(job_id=queued))
    assert job.state == Job.ERROR
    assert (job.error.code, job.error.message) == (1, "canceled")
    assert job.HasField("cancel_time") and job.HasField("complete_time")

    fake = await runner(channel, "r")
    try:
        # RUNNING: the runner is asked to stop, then a second cancel forces it.
        running = await queue(vagrant, t.noop_job())
        stream = fake.job_stream()
        await stream.take()
        await t.wait_for_state(vagrant, running, Job.RUNNING)
        await vagrant.CancelJob(vs.CancelJobRequest(job_id=running))
        first = await stream.read()
        assert first.cancel.force is False
        canceling = await vagrant.GetJob(vs.GetJobRequest(job_id=running))
        assert canceling.state == Job.RUNNING and canceling.HasField("cancel_time")
        await vagrant.CancelJob(vs.CancelJobRequest(job_id=running))
        second = await stream.read()
        assert second.cancel.force is True
        forced = await vagrant.GetJob(vs.GetJobRequest(job_id=running))
        assert forced.state == Job.ERROR and forced.error.message == "canceled"
        assert await stream.read() is grpc.aio.EOF  # type: ignore[attr-defined]  # stream closed

        # Completed: a no-op.
        await vagrant.CancelJob(vs.CancelJobRequest(job_id=running))
        assert (await vagrant.GetJob(vs.GetJobRequest(job_id=running))) == forced
    finally:
        await fake.close()


async def test_graceful_cancel_lets_the_runner_finish_with_error(
    vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    fake = await runner(channel, "r")
    try:
        job_id = await queue(vagrant, t.noop_job())
        stream = fake.job_stream()
        await stream.take()
        await t.wait_for_state(vagrant, job_id, Job.RUNNING)
        await vagrant.CancelJob(vs.CancelJobRequest(job_id=job_id))
        assert (await stream.read()).cancel.force is False
        await stream.output("stopping")
        await stream.fail("canceled", code=1)
        job = await t.wait_for_state(vagrant, job_id, Job.ERROR)
        assert job.error.message == "canceled"
        assert t.terminal_lines(await t.watch(vagrant, job_id)) == ["stopping"]
    finally:
        await fake.close()


async def test_complete_after_force_cancel_is_refused(
    vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    fake = await runner(channel, "r")
    try:
        job_id = await queue(vagrant, t.noop_job())
        stream = fake.job_stream()
        await stream.take()
        await t.wait_for_state(vagrant, job_id, Job.RUNNING)
        for _ in range(2):
            await vagrant.CancelJob(vs.CancelJobRequest(job_id=job_id))
        job = await t.wait_for_state(vagrant, job_id, Job.ERROR)
        assert job.error.message == "canceled"
    finally:
        await fake.close()


# -- watching ----------------------------------------------------------------------


async def test_watchers_before_during_and_after_see_every_line_once_in_order(
    vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    fake = await runner(channel, "r")
    try:
        job_id = await queue(vagrant, t.noop_job())
        before = asyncio.ensure_future(t.watch(vagrant, job_id))
        stream = fake.job_stream()
        await stream.take()
        expected = [f"line {i}" for i in range(300)]
        for i in range(0, 150, 10):
            await stream.output(*expected[i : i + 10])
        during = asyncio.ensure_future(t.watch(vagrant, job_id))
        await asyncio.sleep(0.2)
        for i in range(150, 300, 10):
            await stream.output(*expected[i : i + 10])
        await stream.complete()
        await t.wait_for_state(vagrant, job_id, Job.SUCCESS)
        after = await t.watch(vagrant, job_id)
        for events in (await before, await during, after):
            assert t.terminal_lines(events) == expected
            kinds = [e.WhichOneof("event") for e in events]
            assert kinds[0] == "open" and kinds[-1] == "complete"
            assert kinds.count("complete") == 1
        # A finished job: Open, State(UNKNOWN -> final), buffered output, Complete.
        assert after[1].state.previous == Job.UNKNOWN
        assert after[1].state.current == Job.SUCCESS
        assert all(e.terminal.buffered for e in after if e.WhichOneof("event") == "terminal")
        live = [e.terminal.buffered for e in await before if e.WhichOneof("event") == "terminal"]
        assert live and not any(live)
        states = [e.state.current for e in await before if e.WhichOneof("event") == "state"]
        assert states[-1] == Job.SUCCESS
        assert states == sorted(
            states, key=[Job.QUEUED, Job.WAITING, Job.RUNNING, Job.SUCCESS].index
        )
    finally:
        await fake.close()


async def test_watch_missing_job_is_not_found_before_any_message(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    call = vagrant.GetJobStream(vs.GetJobStreamRequest(job_id="01NOPE"))
    await t.expect_status(call.read(), StatusCode.NOT_FOUND, "job not found")


async def test_watch_reports_the_cancel_flag(
    vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    fake = await runner(channel, "r")
    try:
        job_id = await queue(vagrant, t.noop_job())
        stream = fake.job_stream()
        await stream.take()
        await t.wait_for_state(vagrant, job_id, Job.RUNNING)
        watcher = asyncio.ensure_future(t.watch(vagrant, job_id))
        await asyncio.sleep(0.2)
        await vagrant.CancelJob(vs.CancelJobRequest(job_id=job_id))
        await stream.read()
        await stream.fail("canceled", code=1)
        states = [e.state for e in await watcher if e.WhichOneof("event") == "state"]
        assert any(s.canceling and s.current == Job.RUNNING for s in states)
    finally:
        await fake.close()


async def test_a_watcher_that_looks_only_after_the_end_still_sees_the_canceling_state(
    server: RunningServer, vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    """Cancel and the runner's error can both commit before a watcher reads the job
    again; it still reports the canceling state the job went through, then the end."""
    fake = await runner(channel, "r")
    engine = server.engine
    real_get = engine.get
    blocked, release = False, asyncio.Event()

    async def get(job_id: str) -> vs.Job:
        if blocked:
            await release.wait()
        return await real_get(job_id)

    engine.get = get  # type: ignore[method-assign]
    try:
        job_id = await queue(vagrant, t.noop_job())
        stream = fake.job_stream()
        await stream.take()
        call: Any = vagrant.GetJobStream(vs.GetJobStreamRequest(job_id=job_id), timeout=60)
        while (event := await call.read()).WhichOneof("event") != "state" or (
            event.state.current != Job.RUNNING
        ):
            pass
        blocked = True
        await vagrant.CancelJob(vs.CancelJobRequest(job_id=job_id))
        await stream.fail("gave up", code=1)
        deadline = asyncio.get_running_loop().time() + 60
        while (await engine.store.job_get(job_id)).state != Job.ERROR:
            assert asyncio.get_running_loop().time() < deadline, "the job never ended"
            await asyncio.sleep(0.02)
        release.set()
        states = []
        async for event in call:
            if event.WhichOneof("event") == "state":
                states.append((event.state.previous, event.state.current, event.state.canceling))
        assert states == [
            (Job.RUNNING, Job.RUNNING, True),
            (Job.RUNNING, Job.ERROR, True),
        ]
    finally:
        engine.get = real_get  # type: ignore[method-assign]
        release.set()
        await fake.close()


# -- prune -------------------------------------------------------------------------


async def test_prune_keeps_the_newest_finished_and_every_unfinished_job(
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    finished = []
    for _ in range(55):
        job_id = await queue(vagrant, t.noop_job("nobody"))
        await vagrant.CancelJob(vs.CancelJobRequest(job_id=job_id))
        finished.append(job_id)
    waiting = [await queue(vagrant, t.noop_job("nobody")) for _ in range(3)]
    await vagrant.PruneOldJobs(Empty())
    left = {j.id for j in (await vagrant._ListJobs(vs.ListJobsRequest())).jobs}
    assert left == set(finished[-50:]) | set(waiting)
