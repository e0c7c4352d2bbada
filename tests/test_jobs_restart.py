"""Crash safety of the job engine: kill -9 and restart on the same database
(docs/protocols.md, sections 2-3).

Each test runs `waystation server run` as a child process with short timers,
kills it (SIGKILL: no shutdown code runs) and starts it again on the same
database; the test talks to it over grpc.aio channels as clients and runners do.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import aio

from waystation import testing as t
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc

Job = vs.Job

ACK_TIMEOUT = 2.0
HEARTBEAT_TIMEOUT = 3.0
TIMERS = ("--ack-timeout", "2s", "--heartbeat-timeout", "3s", "--poll-interval", "200ms")
SHUTDOWN_GRACE = 10.0  # ServerSettings.shutdown_grace: `server run` has no flag for it
SLACK = 0.05  # seconds of clock and rounding tolerance in timer checks


@pytest.fixture
def server(backend_url: str, tmp_path: Path) -> Iterator[t.ServerProcess]:
    process = t.ServerProcess(tmp_path / "data", backend_url, *TIMERS)
    yield process
    if process.proc is not None and process.proc.poll() is None:
        process.kill()  # before the PostgreSQL schema is dropped


async def start(server: t.ServerProcess) -> str:
    return await asyncio.to_thread(server.start)


async def queue(stub: vs_grpc.VagrantAsyncStub, job: vs.Job, expires_in: str = "") -> str:
    resp = await stub.QueueJob(vs.QueueJobRequest(job=job, expires_in=expires_in))
    return resp.job_id


async def runner(channel: aio.Channel, runner_id: str) -> t.FakeRunner:
    fake = t.FakeRunner(channel, runner_id, by_id_only=True)
    await fake.register()
    return fake


async def all_jobs(stub: vs_grpc.VagrantAsyncStub) -> dict[str, vs.Job]:
    return {j.id: j for j in (await stub._ListJobs(vs.ListJobsRequest())).jobs}


def seconds(stamp: Timestamp) -> float:
    return stamp.ToMicroseconds() / 1e6


def lines(prefix: str, count: int) -> list[str]:
    return [f"{prefix} {i}" for i in range(count)]


async def send_lines(stream: t.JobStream, text: list[str], per_batch: int = 10) -> None:
    for i in range(0, len(text), per_batch):
        await stream.output(*text[i : i + per_batch])


def assert_finished_stream(
    events: list[vs.GetJobStreamResponse], final: int, expected: list[str]
) -> None:
    """A finished job's stream: Open, State(UNKNOWN -> final), buffered output, Complete."""
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "open" and kinds[-1] == "complete", kinds
    assert kinds.count("complete") == 1
    assert events[1].state.previous == Job.UNKNOWN
    assert events[1].state.current == final
    assert t.terminal_lines(events) == expected
    assert all(e.terminal.buffered for e in events if e.WhichOneof("event") == "terminal")


# -- kill -9 with jobs in every state -------------------------------------------------


async def test_kill_9_with_jobs_in_every_state_loses_nothing(server: t.ServerProcess) -> None:
    ok_lines, err_lines = lines("ok", 200), lines("err", 30)
    run_lines, late_lines = lines("run", 50), lines("late", 50)
    result = Job.Result(run=Job.CommandResult(exit_code=0, run_result=True))

    address = await start(server)
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        worker = await runner(channel, "worker")
        slow = await runner(channel, "slow")
        # QUEUED: aimed at a runner that never comes.
        queued_id = await queue(stub, t.noop_job("nobody", labels={"k": "v"}), expires_in="1h")
        # SUCCESS with output.
        ok_id = await queue(stub, t.noop_job("worker"))
        stream = worker.job_stream()
        assert (await stream.take()).id == ok_id
        await send_lines(stream, ok_lines)
        await stream.complete(result)
        await t.wait_for_state(stub, ok_id, Job.SUCCESS)
        # ERROR with output.
        err_id = await queue(stub, t.noop_job("worker"))
        stream = worker.job_stream()
        assert (await stream.take()).id == err_id
        await send_lines(stream, err_lines)
        await stream.fail("disk full", code=13)
        await t.wait_for_state(stub, err_id, Job.ERROR)
        # RUNNING with output: some persisted for sure, some sent just before the kill.
        run_id = await queue(stub, t.noop_job("worker"))
        running = worker.job_stream()
        assert (await running.take()).id == run_id
        await t.wait_for_state(stub, run_id, Job.RUNNING)
        await send_lines(running, run_lines)
        await asyncio.sleep(1.0)  # the output writer persists within ~50 ms
        last_heartbeat = time.time()
        await running.heartbeat()
        await send_lines(running, late_lines)
        # WAITING: assigned, never acked (the stream stays open: no nack).
        wait_id = await queue(stub, t.noop_job("slow"))
        waiting = slow.job_stream()
        await waiting.request()
        assert (await waiting.assignment()).id == wait_id

        before = await all_jobs(stub)
        server.kill()
        running.cancel()
        waiting.cancel()
        await worker.close()
        await slow.close()

    assert {j: before[j].state for j in (queued_id, wait_id, run_id, ok_id, err_id)} == {
        queued_id: Job.QUEUED,
        wait_id: Job.WAITING,
        run_id: Job.RUNNING,
        ok_id: Job.SUCCESS,
        err_id: Job.ERROR,
    }
    ack_deadline = seconds(before[wait_id].assign_time) + ACK_TIMEOUT

    address = await start(server)
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        after = await all_jobs(stub)
        assert sorted(after) == sorted(before)  # same ids, none lost, none made up
        for job_id in (queued_id, ok_id, err_id):
            assert after[job_id] == before[job_id]  # state, result, error, times, all of it
        assert after[ok_id].result == result
        assert (after[err_id].error.code, after[err_id].error.message) == (13, "disk full")
        assert after[queued_id].expire_time == before[queued_id].expire_time
        assert after[wait_id].state in (Job.WAITING, Job.QUEUED)
        assert after[run_id].state in (Job.RUNNING, Job.ERROR)

        crashed_watch = asyncio.ensure_future(t.watch(stub, run_id, timeout=30))

        # WAITING goes back to QUEUED, not before its ack deadline ...
        requeued = await t.wait_for_state(stub, wait_id, Job.QUEUED, timeout=15)
        assert time.time() >= ack_deadline - SLACK
        assert not requeued.HasField("assign_time") and not requeued.assigned_runner.id
        # ... and its runner, back on the new server, runs it.
        slow = await runner(channel, "slow")
        try:
            stream = slow.job_stream()
            assert (await stream.take()).id == wait_id
            await stream.output("second chance")
            await stream.complete(result)
            done = await t.wait_for_state(stub, wait_id, Job.SUCCESS)
            assert done.assigned_runner.id == "slow" and done.result == result
            assert t.terminal_lines(await t.watch(stub, wait_id)) == ["second chance"]
        finally:
            await slow.close()

        # RUNNING, runner gone: ERROR CANCELLED "canceled" by the heartbeat timeout.
        ended = await t.wait_for_state(stub, run_id, Job.ERROR, timeout=15)
        assert (ended.error.code, ended.error.message) == (1, "canceled")
        assert ended.HasField("complete_time")
        assert seconds(ended.complete_time) >= last_heartbeat + HEARTBEAT_TIMEOUT - SLACK
        # Its output: what was persisted before the kill, in order, each line once.
        events = await crashed_watch
        got = t.terminal_lines(events)
        assert got == (run_lines + late_lines)[: len(got)]
        assert got[: len(run_lines)] == run_lines  # persisted a second before the kill
        assert [e.WhichOneof("event") for e in events].count("complete") == 1
        assert events[-1].complete.error.message == "canceled"
        assert t.terminal_lines(await t.watch(stub, run_id)) == got  # and again, the same

        # Finished jobs: all their output, from the database this time.
        ok_events = await t.watch(stub, ok_id)
        assert_finished_stream(ok_events, Job.SUCCESS, ok_lines)
        assert ok_events[-1].complete.result == result
        err_events = await t.watch(stub, err_id)
        assert_finished_stream(err_events, Job.ERROR, err_lines)
        assert err_events[-1].complete.error.message == "disk full"

        # The QUEUED job is still waiting for its runner.
        assert (await stub.GetJob(vs.GetJobRequest(job_id=queued_id))).state == Job.QUEUED

    assert server.stop() == 0


# -- persist before acknowledge ---------------------------------------------------------


@pytest.mark.parametrize("count", [1, 50])
async def test_jobs_queued_right_before_kill_9_are_there_after_restart(
    server: t.ServerProcess, count: int
) -> None:
    address = await start(server)
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        ids = await asyncio.gather(*(queue(stub, t.noop_job("later")) for _ in range(count)))
        server.kill()  # at once: every QueueJob above was answered
    assert len(set(ids)) == count

    address = await start(server)
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        after = await all_jobs(stub)
        assert sorted(after) == sorted(ids)
        assert all(job.state == Job.QUEUED for job in after.values())
        # They are real queued jobs: a runner gets every one of them.
        fake = await runner(channel, "later")
        try:
            taken = []
            for _ in ids:
                stream = fake.job_stream()
                taken.append((await stream.take()).id)
                await stream.complete()
            assert sorted(taken) == sorted(ids)
            for job_id in ids:
                await t.wait_for_state(stub, job_id, Job.SUCCESS)
        finally:
            await fake.close()
    assert server.stop() == 0


# -- runners across a restart -------------------------------------------------------------


async def test_a_live_runner_reconnects_after_restart_and_takes_new_jobs(
    server: t.ServerProcess,
) -> None:
    address = await start(server)
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        fake = await runner(channel, "phoenix")
        stream = fake.job_stream()
        first = await queue(stub, t.noop_job("phoenix"))
        assert (await stream.take()).id == first
        await stream.complete()
        await t.wait_for_state(stub, first, Job.SUCCESS)
        idle = fake.job_stream()
        await idle.request()  # waiting for work when the server dies
        await asyncio.sleep(0.3)
        server.kill()
        with pytest.raises(aio.AioRpcError) as broken:
            await idle.read(timeout=10)
        assert broken.value.code() in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED)
        await fake.close()

    address = await start(server)
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        fake = await runner(channel, "phoenix")  # new RunnerConfig stream
        try:
            assert (await stub.GetRunner(vs.GetRunnerRequest(runner_id="phoenix"))).by_id_only
            for n in range(2):
                stream = fake.job_stream()  # a new RunnerJobStream, waiting first
                await stream.request()
                await asyncio.sleep(0.1)
                job_id = await queue(stub, t.noop_job("phoenix"))
                assert (await stream.assignment()).id == job_id
                await stream.send(ack=stream.Req.Ack())
                await stream.output(f"after restart {n}")
                await stream.complete()
                done = await t.wait_for_state(stub, job_id, Job.SUCCESS)
                assert done.assigned_runner.id == "phoenix"
                assert t.terminal_lines(await t.watch(stub, job_id)) == [f"after restart {n}"]
        finally:
            await fake.close()
    assert server.stop() == 0


async def test_sigterm_with_a_runner_waiting_for_work_exits_0_within_the_grace(
    server: t.ServerProcess,
) -> None:
    address = await start(server)
    async with aio.insecure_channel(address) as channel:
        fake = await runner(channel, "idle")
        stream = fake.job_stream()
        await stream.request()
        await asyncio.sleep(0.3)  # parked in the server, waiting for a job
        began = time.monotonic()
        code = await asyncio.to_thread(server.stop, signal.SIGTERM, SHUTDOWN_GRACE + 20)
        elapsed = time.monotonic() - began
        with pytest.raises(aio.AioRpcError):
            await stream.read(timeout=5)  # its stream ended, no assignment
        await fake.close()
    assert code == 0, server.output()
    assert elapsed < SHUTDOWN_GRACE + 2, f"took {elapsed:.1f}s"
    log = server.output()
    assert "stopped" in log
    assert "Traceback" not in log


async def test_no_job_is_handed_out_during_graceful_shutdown(server: t.ServerProcess) -> None:
    address = await start(server)
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        fake = await runner(channel, "idle")
        job_id = await queue(stub, t.noop_job("idle"))
        holder = fake.job_stream()
        await holder.request()
        assert (await holder.assignment()).id == job_id  # WAITING; never acked
        parked = fake.job_stream()
        await parked.request()
        await asyncio.sleep(0.3)  # waiting for work
        stopping = asyncio.ensure_future(
            asyncio.to_thread(server.stop, signal.SIGTERM, SHUTDOWN_GRACE + 20)
        )
        # The ack timeout (2 s) passes inside the grace (10 s): the job is QUEUED again.
        try:
            reply: vs.RunnerJobStreamResponse | None = await parked.read(SHUTDOWN_GRACE + 5)
        except aio.AioRpcError:
            reply = None
        code = await stopping
        holder.cancel()
        parked.cancel()
        await fake.close()
    assert code == 0
    assert reply is None, f"a stopping server handed out work: {reply}"

    address = await start(server)
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        await t.wait_for_state(stub, job_id, Job.QUEUED, timeout=15)
        fake = await runner(channel, "idle")
        try:
            stream = fake.job_stream()
            assert (await stream.take()).id == job_id
            await stream.complete()
            await t.wait_for_state(stub, job_id, Job.SUCCESS)
        finally:
            await fake.close()
    assert server.stop() == 0
