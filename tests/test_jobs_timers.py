"""Job timers over gRPC: ack timeout, heartbeat timeout, expiry (docs/protocols.md, sections 2-3).

The engine runs with short timeouts here. Tests never assert that something
happened quickly: only that it happened within a generous deadline, and that
it did not happen before it was allowed to, checked against the server's own
timestamps, so a slow machine cannot fail them. A "stays" check (a state
held while a healthy runner heartbeats) allows 5x the heartbeat interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any, cast

import pytest
import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp
from grpc import StatusCode, aio

from waystation import testing as t
from waystation.core.timeouts import Timeouts
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.server.app import RunningServer
from waystation.store import schema

if TYPE_CHECKING:
    from waystation.protocol.vagrant_server_pb2_grpc import VagrantAsyncStub as Stub

Job = vs.Job

ACK = 1.0
HEARTBEAT = 1.5
POLL = 0.2
BEAT_EVERY = 0.3  # how often a healthy runner heartbeats here: 5x under the timeout
DEADLINE = 15.0  # generous bound for "it happens eventually"
CANCELED = (1, "canceled")  # google.rpc.Code.CANCELLED, upstream's message


@pytest.fixture
def timeouts() -> Timeouts:
    return Timeouts(ack=ACK, heartbeat=HEARTBEAT, poll=POLL)


# -- helpers -----------------------------------------------------------------------


async def queue(vagrant: Stub, job: vs.Job, expires_in: str = "") -> str:
    resp = await vagrant.QueueJob(vs.QueueJobRequest(job=job, expires_in=expires_in))
    return resp.job_id


async def get(vagrant: Stub, job_id: str) -> vs.Job:
    return await vagrant.GetJob(vs.GetJobRequest(job_id=job_id))


async def runner(channel: aio.Channel, runner_id: str) -> t.FakeRunner:
    fake = t.FakeRunner(channel, runner_id)
    await fake.register()
    return fake


@contextlib.asynccontextmanager
async def runners(channel: aio.Channel, *ids: str) -> AsyncIterator[list[t.FakeRunner]]:
    fakes = [await runner(channel, runner_id) for runner_id in ids]
    try:
        yield fakes
    finally:
        for fake in fakes:
            await fake.close()


def us(stamp: Timestamp) -> int:
    return stamp.ToMicroseconds()


def wall_us() -> int:
    return time.time_ns() // 1000


async def parked(fake: t.FakeRunner) -> t.JobStream:
    """A job stream that has sent its Request and waits for an assignment."""
    stream = fake.job_stream()
    await stream.request()
    return stream


@contextlib.asynccontextmanager
async def heartbeating(stream: t.JobStream) -> AsyncIterator[None]:
    """Heartbeat every BEAT_EVERY seconds while inside; a failed write fails the test."""

    async def beat() -> None:
        while True:
            await stream.heartbeat()
            await asyncio.sleep(BEAT_EVERY)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def stays(vagrant: Stub, job_id: str, state: int, until_us: int) -> vs.Job:
    """Assert the job is in `state` at every look until wall time `until_us`."""
    while True:
        job = await get(vagrant, job_id)
        assert job.state == state, (
            f"job left {Job.State.Name(state)}: now {Job.State.Name(job.state)}, "  # type: ignore[arg-type]
            f"error {job.error.message!r}"
        )
        if wall_us() > until_us:
            return job
        await asyncio.sleep(0.1)


async def remaining_events(stream: t.JobStream) -> list[vs.RunnerJobStreamResponse]:
    """Every message the server still sends on a stream, up to its end."""
    events: list[vs.RunnerJobStreamResponse] = []
    while (event := await stream.read(DEADLINE)) is not aio.EOF:  # type: ignore[attr-defined]
        events.append(event)
    return events


async def finish_cleanly(vagrant: Stub, stream: t.JobStream, job_id: str) -> vs.Job:
    """Complete the job on `stream`: it must end SUCCESS and the runner saw no Cancel."""
    result = Job.Result(run=Job.CommandResult(exit_code=0, run_result=True))
    await stream.complete(result)
    events = await remaining_events(stream)
    assert not [e for e in events if e.WhichOneof("event") == "cancel"], events
    assert await stream.call.code() == StatusCode.OK
    job = await t.wait_for_state(vagrant, job_id, Job.SUCCESS, DEADLINE)
    assert job.result == result
    assert not job.HasField("error") and not job.HasField("cancel_time")
    return job


def assert_cancelled(job: vs.Job) -> None:
    assert job.state == Job.ERROR
    assert (job.error.code, job.error.message) == CANCELED
    assert job.HasField("cancel_time") and job.HasField("complete_time")


# -- ack timeout -------------------------------------------------------------------


async def test_unacked_job_is_requeued_after_the_ack_timeout_then_runs_elsewhere(
    vagrant: Stub, channel: aio.Channel
) -> None:
    async with runners(channel, "slow", "quick") as (slow, quick):
        job_id = await queue(vagrant, t.noop_job())
        first = await parked(slow)
        assigned = await first.assignment(DEADLINE)  # the job as it was when assigned
        assert assigned.id == job_id
        assert assigned.state == Job.WAITING and assigned.assigned_runner.id == "slow"
        assert assigned.HasField("assign_time")

        # Nobody else is waiting, so the requeued job stays QUEUED for us to look at.
        requeued = await t.wait_for_state(vagrant, job_id, Job.QUEUED, DEADLINE)
        seen_at = wall_us()
        assert not requeued.HasField("assign_time")
        assert not requeued.assigned_runner.id
        assert not requeued.HasField("cancel_time") and not requeued.HasField("complete_time")
        assert seen_at >= us(assigned.assign_time) + ACK * 1e6  # not before the ack deadline

        second = quick.job_stream()
        assert (await second.take(DEADLINE)).id == job_id
        running = await t.wait_for_state(vagrant, job_id, Job.RUNNING, DEADLINE)
        assert running.assigned_runner.id == "quick"
        done = await finish_cleanly(vagrant, second, job_id)
        assert done.assigned_runner.id == "quick"


async def test_ack_timeout_wakes_a_waiting_runner_and_watchers_follow_to_the_end(
    vagrant: Stub, channel: aio.Channel
) -> None:
    async with runners(channel, "slow", "quick") as (slow, quick):
        job_id = await queue(vagrant, t.noop_job())
        watcher = asyncio.ensure_future(t.watch(vagrant, job_id, DEADLINE * 3))
        first = await parked(slow)
        assigned = await first.assignment(DEADLINE)
        assert assigned.id == job_id
        second = await parked(quick)  # nothing for it now; the requeue must wake it

        reassigned = await second.assignment(DEADLINE)
        assert reassigned.id == job_id and reassigned.assigned_runner.id == "quick"
        assert us(reassigned.assign_time) >= us(assigned.assign_time) + ACK * 1e6
        await second.send(ack=second.Req.Ack())
        await t.wait_for_state(vagrant, job_id, Job.RUNNING, DEADLINE)
        await second.output("from quick")
        await finish_cleanly(vagrant, second, job_id)

        events = await watcher
        kinds = [e.WhichOneof("event") for e in events]
        assert kinds.count("complete") == 1 and kinds[-1] == "complete"
        assert events[-1].complete.error.code == 0
        assert events[-1].complete.result.run.run_result
        assert t.terminal_lines(events) == ["from quick"]
        states = [e.state.current for e in events if e.WhichOneof("event") == "state"]
        assert states[-1] == Job.SUCCESS


# -- stale timers from an earlier assignment -----------------------------------------


@pytest.mark.parametrize("requeue", ["nack", "ack_timeout"])
async def test_timers_of_an_earlier_assignment_do_not_end_the_job(
    vagrant: Stub, channel: aio.Channel, requeue: str
) -> None:
    """Upstream bug: a nack or ack timeout armed a heartbeat timer that later
    force-cancelled the job under its next runner. Ours must not."""
    async with runners(channel, "first", "second") as (first_runner, second_runner):
        job_id = await queue(vagrant, t.noop_job())
        first = await parked(first_runner)
        assert (await first.assignment(DEADLINE)).id == job_id
        if requeue == "nack":
            await first.fail("not now")
        requeued = await t.wait_for_state(vagrant, job_id, Job.QUEUED, DEADLINE)
        requeued_at = wall_us()  # every timer of the first assignment was armed before this
        assert not requeued.HasField("cancel_time")

        second = second_runner.job_stream()
        assert (await second.take(DEADLINE)).id == job_id
        await t.wait_for_state(vagrant, job_id, Job.RUNNING, DEADLINE)
        async with heartbeating(second):
            # Well past any ack or heartbeat deadline the first assignment could have armed.
            held = await stays(
                vagrant, job_id, Job.RUNNING, requeued_at + int((ACK + 2 * HEARTBEAT) * 1e6)
            )
        assert held.assigned_runner.id == "second"
        assert not held.HasField("cancel_time")
        await finish_cleanly(vagrant, second, job_id)


# A longer ack timeout here: the second runner's assignment must outlive the checks.
@pytest.mark.parametrize("timeouts", [Timeouts(ack=2.5, heartbeat=HEARTBEAT, poll=POLL)])
@pytest.mark.parametrize("late", ["ack", "disconnect"])
async def test_first_runner_acting_late_does_not_disturb_the_next_assignment(
    vagrant: Stub, channel: aio.Channel, late: str
) -> None:
    """After its ack timeout, the first runner's stream is still open. Whatever it
    does now must not touch the job, which belongs to the second runner."""
    async with runners(channel, "first", "second") as (first_runner, second_runner):
        job_id = await queue(vagrant, t.noop_job())
        first = await parked(first_runner)
        assert (await first.assignment(DEADLINE)).id == job_id
        await t.wait_for_state(vagrant, job_id, Job.QUEUED, DEADLINE)

        second = await parked(second_runner)
        assert (await second.assignment(DEADLINE)).id == job_id
        assigned = await get(vagrant, job_id)
        assert assigned.state == Job.WAITING and assigned.assigned_runner.id == "second"

        # The stale stream acts while the second runner holds the job, not yet acked.
        if late == "ack":
            await first.send(ack=first.Req.Ack())
            await t.expect_status(first.read(DEADLINE), StatusCode.FAILED_PRECONDITION)
        else:
            first.cancel()
        # Give the server time to act on it: the job stays with the second runner.
        still = await stays(vagrant, job_id, Job.WAITING, wall_us() + 800_000)
        assert still.assigned_runner.id == "second"

        await second.send(ack=second.Req.Ack())
        running = await t.wait_for_state(vagrant, job_id, Job.RUNNING, DEADLINE)
        assert running.assigned_runner.id == "second"
        await finish_cleanly(vagrant, second, job_id)


# -- heartbeat timeout -------------------------------------------------------------


async def test_silent_runner_is_force_cancelled_by_the_heartbeat_timeout(
    vagrant: Stub, channel: aio.Channel
) -> None:
    async with runners(channel, "r") as (fake,):
        job_id = await queue(vagrant, t.noop_job())
        stream = fake.job_stream()
        assert (await stream.take(DEADLINE)).id == job_id
        await t.wait_for_state(vagrant, job_id, Job.RUNNING, DEADLINE)
        await stream.heartbeat()  # one beat, then silence
        watcher = asyncio.ensure_future(t.watch(vagrant, job_id, DEADLINE * 2))

        # Then silence, with the stream open: the server forces it to stop and closes it.
        cancel = await stream.read(DEADLINE)
        cancelled_at = wall_us()
        assert cancel.WhichOneof("event") == "cancel", cancel
        assert cancel.cancel.force is True
        assert await remaining_events(stream) == []

        job = await t.wait_for_state(vagrant, job_id, Job.ERROR, DEADLINE)
        assert_cancelled(job)
        # Not before the deadline (the ack armed it; the heartbeat may only push it later).
        assert us(job.complete_time) >= us(job.ack_time) + HEARTBEAT * 1e6
        assert cancelled_at >= us(job.complete_time)  # the Cancel came once the job had ended
        assert job.assigned_runner.id == "r"

        # A watcher following the job gets the final state and a Complete with the error.
        events = await watcher
        assert [e.WhichOneof("event") for e in events].count("complete") == 1
        assert events[-1].WhichOneof("event") == "complete"
        assert (events[-1].complete.error.code, events[-1].complete.error.message) == CANCELED
        states = [e.state for e in events if e.WhichOneof("event") == "state"]
        assert states[-1].current == Job.ERROR


async def test_heartbeat_timeout_forces_a_job_whose_graceful_cancel_went_unanswered(
    vagrant: Stub, channel: aio.Channel
) -> None:
    async with runners(channel, "r") as (fake,):
        job_id = await queue(vagrant, t.noop_job())
        stream = fake.job_stream()
        assert (await stream.take(DEADLINE)).id == job_id
        await t.wait_for_state(vagrant, job_id, Job.RUNNING, DEADLINE)
        await vagrant.CancelJob(vs.CancelJobRequest(job_id=job_id))
        first = await stream.read(DEADLINE)
        assert first.WhichOneof("event") == "cancel" and first.cancel.force is False
        canceling = await get(vagrant, job_id)
        assert canceling.state == Job.RUNNING and canceling.HasField("cancel_time")

        # The runner neither stops nor heartbeats: the timeout forces the end.
        second = await stream.read(DEADLINE)
        assert second.WhichOneof("event") == "cancel" and second.cancel.force is True
        assert await remaining_events(stream) == []
        job = await t.wait_for_state(vagrant, job_id, Job.ERROR, DEADLINE)
        assert_cancelled(job)
        assert job.cancel_time == canceling.cancel_time  # the first request's time stays
        assert us(job.complete_time) >= us(job.ack_time) + HEARTBEAT * 1e6


async def test_heartbeating_runner_keeps_its_job_running(
    vagrant: Stub, channel: aio.Channel
) -> None:
    async with runners(channel, "r") as (fake,):
        job_id = await queue(vagrant, t.noop_job())
        stream = fake.job_stream()
        assert (await stream.take(DEADLINE)).id == job_id
        running = await t.wait_for_state(vagrant, job_id, Job.RUNNING, DEADLINE)
        async with heartbeating(stream):
            held = await stays(
                vagrant, job_id, Job.RUNNING, us(running.ack_time) + int(3 * HEARTBEAT * 1e6)
            )
        assert not held.HasField("cancel_time") and not held.HasField("complete_time")
        await finish_cleanly(vagrant, stream, job_id)


async def test_runner_disconnecting_after_ack_is_ended_by_the_heartbeat_timeout(
    vagrant: Stub, channel: aio.Channel
) -> None:
    async with runners(channel, "r") as (fake,):
        job_id = await queue(vagrant, t.noop_job())
        stream = fake.job_stream()
        assert (await stream.take(DEADLINE)).id == job_id
        await t.wait_for_state(vagrant, job_id, Job.RUNNING, DEADLINE)
        watcher = asyncio.ensure_future(t.watch(vagrant, job_id, DEADLINE * 2))
        stream.cancel()

        job = await t.wait_for_state(vagrant, job_id, Job.ERROR, DEADLINE)  # not never
        assert_cancelled(job)
        # Not earlier: the disconnect itself does not end it, the silence does.
        assert us(job.complete_time) >= us(job.ack_time) + HEARTBEAT * 1e6
        events = await watcher
        assert events[-1].WhichOneof("event") == "complete"
        assert (events[-1].complete.error.code, events[-1].complete.error.message) == CANCELED


# -- expiry ------------------------------------------------------------------------


async def test_queued_job_nobody_takes_expires(vagrant: Stub) -> None:
    job_id = await queue(vagrant, t.noop_job("nobody"), expires_in="1s")
    queued = await get(vagrant, job_id)
    assert us(queued.expire_time) == us(queued.queue_time) + 1_000_000
    watcher = asyncio.ensure_future(t.watch(vagrant, job_id, DEADLINE * 2))

    job = await t.wait_for_state(vagrant, job_id, Job.ERROR, DEADLINE)
    assert_cancelled(job)
    assert us(job.expire_time) == us(queued.expire_time)  # stays set
    assert us(job.complete_time) >= us(job.expire_time)  # not before it is due
    assert not job.HasField("assign_time") and not job.HasField("ack_time")

    events = await watcher
    assert events[-1].WhichOneof("event") == "complete"
    assert (events[-1].complete.error.code, events[-1].complete.error.message) == CANCELED
    after = await t.watch(vagrant, job_id, DEADLINE)  # a watcher joining later too
    assert after[-1].complete.error.message == "canceled"


@pytest.mark.parametrize("timeouts", [Timeouts(ack=60.0, heartbeat=HEARTBEAT, poll=POLL)])
async def test_waiting_job_expires_and_is_not_requeued(vagrant: Stub, channel: aio.Channel) -> None:
    async with runners(channel, "holder", "other") as (holder, other):
        stream = await parked(holder)
        job_id = await queue(vagrant, t.noop_job(), expires_in="2s")
        assert (await stream.assignment(DEADLINE)).id == job_id  # WAITING, never acked
        watcher = asyncio.ensure_future(t.watch(vagrant, job_id, DEADLINE * 2))

        spare = await parked(other)  # would get the job if it were requeued
        job = await t.wait_for_state(vagrant, job_id, Job.ERROR, DEADLINE)
        assert_cancelled(job)
        assert job.HasField("expire_time")
        assert us(job.complete_time) >= us(job.expire_time)

        # Not requeued: nobody else gets it, and a late ack does not revive it.
        with pytest.raises(TimeoutError):
            await spare.assignment(1.0)
        await stream.send(ack=stream.Req.Ack())
        await t.expect_status(stream.read(DEADLINE), StatusCode.FAILED_PRECONDITION)
        assert (await get(vagrant, job_id)) == job

        events = await watcher
        assert events[-1].WhichOneof("event") == "complete"
        assert (events[-1].complete.error.code, events[-1].complete.error.message) == CANCELED
        assert Job.QUEUED not in [
            e.state.current
            for e in events
            if e.WhichOneof("event") == "state" and e.state.previous == Job.WAITING
        ]


async def test_running_job_is_not_ended_by_its_expiry(vagrant: Stub, channel: aio.Channel) -> None:
    async with runners(channel, "r") as (fake,):
        stream = await parked(fake)
        job_id = await queue(vagrant, t.noop_job(), expires_in="2s")
        assert (await stream.assignment(DEADLINE)).id == job_id
        await stream.send(ack=stream.Req.Ack())
        running = await t.wait_for_state(vagrant, job_id, Job.RUNNING, DEADLINE)
        expire = us(running.expire_time)
        assert us(running.ack_time) < expire  # acked in time: the premise of the test
        async with heartbeating(stream):
            held = await stays(vagrant, job_id, Job.RUNNING, expire + 1_000_000)
        assert not held.HasField("cancel_time")
        done = await finish_cleanly(vagrant, stream, job_id)
        assert us(done.expire_time) == expire  # stays set


async def test_expiry_survives_a_requeue(vagrant: Stub, channel: aio.Channel) -> None:
    """A nacked job keeps its expire_time and still expires once QUEUED again."""
    async with runners(channel, "r") as (fake,):
        stream = await parked(fake)
        job_id = await queue(vagrant, t.noop_job(), expires_in="2s")
        assert (await stream.assignment(DEADLINE)).id == job_id
        await stream.fail("not now")
        requeued = await t.wait_for_state(vagrant, job_id, Job.QUEUED, DEADLINE)
        assert requeued.HasField("expire_time")
        job = await t.wait_for_state(vagrant, job_id, Job.ERROR, DEADLINE)
        assert_cancelled(job)
        assert us(job.expire_time) == us(requeued.expire_time)
        assert us(job.complete_time) >= us(job.expire_time)


# -- a stale stream of the same runner -----------------------------------------------


@pytest.mark.parametrize("timeouts", [Timeouts(ack=2.5, heartbeat=HEARTBEAT, poll=POLL)])
@pytest.mark.parametrize("late", ["ack", "error"])
async def test_stale_stream_of_the_same_runner_does_not_touch_its_new_assignment(
    vagrant: Stub, channel: aio.Channel, late: str
) -> None:
    """One runner, two streams: the first let its assignment time out, the second got
    the job again. The first stream's late ack, nack or disconnect concerns an
    assignment that no longer exists; the second one's must stand."""
    async with runners(channel, "r") as (fake,):
        job_id = await queue(vagrant, t.noop_job())
        old = await parked(fake)
        assert (await old.assignment(DEADLINE)).id == job_id
        await t.wait_for_state(vagrant, job_id, Job.QUEUED, DEADLINE)
        new = await parked(fake)
        assert (await new.assignment(DEADLINE)).id == job_id

        if late == "ack":
            await old.send(ack=old.Req.Ack())
        else:  # a nack; a disconnect takes the same path in the server
            await old.fail("too late")
        # Give the server time to act on it: the job stays with the new stream.
        still = await stays(vagrant, job_id, Job.WAITING, wall_us() + 800_000)
        assert still.assigned_runner.id == "r"
        if late == "ack":
            await t.expect_status(old.read(DEADLINE), StatusCode.FAILED_PRECONDITION)
        else:
            assert await old.read(DEADLINE) is aio.EOF  # type: ignore[attr-defined]

        await new.send(ack=new.Req.Ack())
        await t.wait_for_state(vagrant, job_id, Job.RUNNING, DEADLINE)
        await finish_cleanly(vagrant, new, job_id)


# -- Complete on success -------------------------------------------------------------


async def test_successful_jobs_complete_event_has_no_error(
    vagrant: Stub, channel: aio.Channel
) -> None:
    """Vagrant's Go client returns the result only when Complete.error is nil;
    a present-but-empty Status makes it return `status.FromProto(err).Err()`,
    which is nil for code OK: the caller gets neither a result nor an error."""
    async with runners(channel, "r") as (fake,):
        job_id = await queue(vagrant, t.noop_job())
        stream = fake.job_stream()
        await stream.take(DEADLINE)
        await t.wait_for_state(vagrant, job_id, Job.RUNNING, DEADLINE)
        await finish_cleanly(vagrant, stream, job_id)
        events = await t.watch(vagrant, job_id, DEADLINE)
        assert events[-1].WhichOneof("event") == "complete"
        assert events[-1].complete.HasField("result")
        assert not events[-1].complete.HasField("error")


LEASE = 2.0


def _online_until(conn: Any, runner_id: str) -> int | None:
    return cast(
        "int | None",
        conn.execute(
            sa.select(schema.runners.c.online_until).where(schema.runners.c.id == runner_id)
        ).scalar_one(),
    )


@pytest.mark.parametrize(
    "timeouts", [Timeouts(ack=ACK, heartbeat=HEARTBEAT, poll=POLL, runner_lease=LEASE)]
)
async def test_a_connected_runner_stays_online_past_its_first_lease(
    server: RunningServer, channel: aio.Channel
) -> None:
    """Leases are renewed (every quarter lease, not on every poll) before they run out."""
    fake = await runner(channel, "leased")
    try:
        first = await server.store._db.read(_online_until, "leased")
        assert first is not None
        # Two leases after the first one ends, it must have been renewed since.
        await asyncio.sleep(max(0.0, (first - time.time_ns() // 1000) / 1e6 + 2 * LEASE))
        until = await server.store._db.read(_online_until, "leased")
        assert until is not None and until > time.time_ns() // 1000
    finally:
        await fake.close()
