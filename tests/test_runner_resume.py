"""A runner survives a server restart: RunnerJobStream with `waystation-resume-job`
(README "How jobs run"). Protocol level, with raw streams: the server answers the
job's Assignment again and `waystation-resume-events: N`, the runner re-sends
from event N; refusals are FAILED_PRECONDITION and change nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest
from grpc import StatusCode, aio

from waystation import testing as t
from waystation.core.timeouts import Timeouts
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.server.app import RunningServer

Job = vs.Job
FP = StatusCode.FAILED_PRECONDITION
TIMERS = ("--ack-timeout", "2s", "--heartbeat-timeout", "20s", "--poll-interval", "200ms")


async def queue(stub: vs_grpc.VagrantAsyncStub, job: vs.Job) -> str:
    return (await stub.QueueJob(vs.QueueJobRequest(job=job))).job_id


async def runner(channel: aio.Channel, runner_id: str) -> t.FakeRunner:
    fake = t.FakeRunner(channel, runner_id, by_id_only=True)
    await fake.register()
    return fake


def lines(prefix: str, count: int) -> list[str]:
    return [f"{prefix} {i}" for i in range(count)]


async def send_in_batches(stream: t.JobStream, text: list[str], sizes: list[int]) -> None:
    """`text` as Terminal messages of the given sizes, over and over."""
    at, i = 0, 0
    while at < len(text):
        size = sizes[i % len(sizes)]
        await stream.output(*text[at : at + size])
        at, i = at + size, i + 1


async def get(stub: vs_grpc.VagrantAsyncStub, job_id: str) -> vs.Job:
    return await stub.GetJob(vs.GetJobRequest(job_id=job_id))


# -- across a kill -9 ----------------------------------------------------------------


@pytest.fixture
def process(backend_url: str, tmp_path: Path) -> Iterator[t.ServerProcess]:
    server = t.ServerProcess(tmp_path / "data", backend_url, *TIMERS)
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.kill()  # before the PostgreSQL schema is dropped


async def test_a_runner_resumes_its_job_after_kill_9_and_nothing_is_lost_or_repeated(
    process: t.ServerProcess,
) -> None:
    early, late, after = lines("early", 60), lines("late", 25), lines("after", 40)
    result = Job.Result(run=Job.CommandResult(exit_code=0, run_result=True))

    address = await asyncio.to_thread(process.start)
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        fake = await runner(channel, "Runner-A")
        job_id = await queue(stub, t.noop_job("runner-a"))
        stream = fake.job_stream()
        assert (await stream.take()).id == job_id
        await t.wait_for_state(stub, job_id, Job.RUNNING)
        # Batches of several sizes: N counts events, not messages.
        await send_in_batches(stream, early, [7, 1, 13])
        await asyncio.sleep(1.0)  # persisted (the writer flushes within ~50 ms)
        await send_in_batches(stream, late, [5, 2])  # in flight, or in an unflushed batch
        process.kill()
        stream.cancel()
        await fake.close()

    address = await asyncio.to_thread(process.start)
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        # A watcher of the restarted server, there before the runner comes back.
        watching = asyncio.ensure_future(t.watch(stub, job_id, timeout=60))
        fake = await runner(channel, "Runner-A")
        try:
            # The runner id matches ignoring case, as everywhere.
            resumed = fake.resume_stream(job_id, runner_id="RUNNER-A")
            job, held = await resumed.resumed()
            assert job.id == job_id and job.state == Job.RUNNING
            assert job.assigned_runner.id.lower() == "runner-a"  # its case: not ours here
            sent = early + late
            assert len(early) <= held <= len(sent)
            await send_in_batches(resumed, sent[held:], [4])  # from event N on
            await resumed.heartbeat()
            await send_in_batches(resumed, after, [3, 9])
            await resumed.complete(result)
            done = await t.wait_for_state(stub, job_id, Job.SUCCESS)
            assert done.result == result
            events = await watching
            assert t.terminal_lines(events) == sent + after  # once each, in order
            assert events[-1].WhichOneof("event") == "complete"
            assert t.terminal_lines(await t.watch(stub, job_id)) == sent + after
        finally:
            await fake.close()
    assert process.stop() == 0


# -- on one server -------------------------------------------------------------------


async def test_a_resume_refused_for_a_finished_job_changes_nothing_and_hands_out_nothing(
    channel: aio.Channel, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    fake = await runner(channel, "r1")
    try:
        done_id = await queue(vagrant, t.noop_job("r1"))
        stream = fake.job_stream()
        assert (await stream.take()).id == done_id
        await stream.output("only line")
        await stream.complete()
        before = await t.wait_for_state(vagrant, done_id, Job.SUCCESS)
        waiting_id = await queue(vagrant, t.noop_job("r1"))  # would fit this runner

        resumed = fake.resume_stream(done_id)
        await resumed.request()
        await t.expect_status(resumed.read(), FP, "SUCCESS")
        assert await get(vagrant, done_id) == before
        assert (await get(vagrant, waiting_id)).state == Job.QUEUED
        assert t.terminal_lines(await t.watch(vagrant, done_id)) == ["only line"]
    finally:
        await fake.close()


async def test_a_resume_of_a_job_held_by_another_runner_is_refused(
    channel: aio.Channel, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    holder = await runner(channel, "holder")
    other = await runner(channel, "other")
    try:
        job_id = await queue(vagrant, t.noop_job("holder"))
        stream = holder.job_stream()
        assert (await stream.take()).id == job_id
        await stream.output("from the holder")
        running = await t.wait_for_state(vagrant, job_id, Job.RUNNING)
        spare = await queue(vagrant, t.noop_job("other"))  # would fit the other runner

        resumed = other.resume_stream(job_id)
        await resumed.request()
        await t.expect_status(resumed.read(), FP, "another runner")
        assert await get(vagrant, job_id) == running
        assert (await get(vagrant, spare)).state == Job.QUEUED
        # The holder's stream is untouched.
        await stream.output("still here")
        await stream.complete()
        await t.wait_for_state(vagrant, job_id, Job.SUCCESS)
        lines_ = t.terminal_lines(await t.watch(vagrant, job_id))
        assert lines_ == ["from the holder", "still here"]
    finally:
        await holder.close()
        await other.close()


@pytest.mark.parametrize("what", ["unknown", "queued"])
async def test_a_resume_of_an_unknown_or_queued_job_is_refused(
    channel: aio.Channel, vagrant: vs_grpc.VagrantAsyncStub, what: str
) -> None:
    fake = await runner(channel, "r1")
    try:
        queued = await queue(vagrant, t.noop_job("r1"))
        job_id = "01ARZ3NDEKTSV4RRFFQ69G5FAV" if what == "unknown" else queued
        before = await get(vagrant, queued)
        resumed = fake.resume_stream(job_id)
        await resumed.request()
        fragment = "no such job" if what == "unknown" else "QUEUED"
        await t.expect_status(resumed.read(), FP, fragment)
        assert await get(vagrant, queued) == before
    finally:
        await fake.close()


async def test_a_resume_takes_over_from_a_stale_stream_of_the_same_runner(
    channel: aio.Channel, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    """The runner lost its stream but this server has not noticed yet: the new
    stream takes over, after the old one's output is persisted and counted."""
    fake = await runner(channel, "r1")
    try:
        job_id = await queue(vagrant, t.noop_job("r1"))
        old = fake.job_stream()
        assert (await old.take()).id == job_id
        await t.wait_for_state(vagrant, job_id, Job.RUNNING)
        first = lines("first", 30)
        await send_in_batches(old, first, [6])
        watching = asyncio.ensure_future(t.watch(vagrant, job_id, timeout=60))
        resumed = fake.resume_stream(job_id)
        _, held = await resumed.resumed()
        assert held == len(first)  # everything the old stream carried
        assert await old.read() is aio.EOF  # type: ignore[attr-defined]  # let go
        await resumed.output("second")
        await resumed.complete()
        await t.wait_for_state(vagrant, job_id, Job.SUCCESS)
        assert t.terminal_lines(await watching) == [*first, "second"]
    finally:
        await fake.close()


@pytest.mark.parametrize("timeouts", [Timeouts(poll=0.25, heartbeat=2.0)])
async def test_a_resumed_stream_gets_cancels_and_its_heartbeats_keep_the_job(
    channel: aio.Channel, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    fake = await runner(channel, "r1")
    try:
        job_id = await queue(vagrant, t.noop_job("r1"))
        old = fake.job_stream()
        assert (await old.take()).id == job_id
        await t.wait_for_state(vagrant, job_id, Job.RUNNING)
        old.cancel()
        resumed = fake.resume_stream(job_id)
        _, held = await resumed.resumed()
        assert held == 0
        for _ in range(10):  # 4 s, twice the heartbeat timeout
            await resumed.heartbeat()
            await asyncio.sleep(0.4)
        assert (await get(vagrant, job_id)).state == Job.RUNNING
        await vagrant.CancelJob(vs.CancelJobRequest(job_id=job_id))
        assert (await resumed.read()).cancel.force is False
        await resumed.fail("stopped", code=1)
        ended = await t.wait_for_state(vagrant, job_id, Job.ERROR)
        assert ended.error.message == "stopped"
    finally:
        await fake.close()


@pytest.mark.parametrize("timeouts", [Timeouts(poll=0.25, heartbeat=1.0)])
async def test_the_heartbeat_timeout_still_ends_a_job_whose_runner_never_resumes(
    server: RunningServer, channel: aio.Channel, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    fake = await runner(channel, "r1")
    try:
        job_id = await queue(vagrant, t.noop_job("r1"))
        stream = fake.job_stream()
        assert (await stream.take()).id == job_id
        await t.wait_for_state(vagrant, job_id, Job.RUNNING)
        stream.cancel()
        ended = await t.wait_for_state(vagrant, job_id, Job.ERROR, timeout=30)
        assert ended.error.message == "canceled"
        late = fake.resume_stream(job_id)
        await late.request()
        await t.expect_status(late.read(), FP, "ERROR")
    finally:
        await fake.close()
