"""Jobs under load, and the serialization rule for Command jobs (docs/protocols.md, sections 2-3).

Many runners against many queued jobs: every job runs once and ends SUCCESS.
Command jobs on one target never overlap, while jobs on other targets, and
non-command jobs on the same target, keep running.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from grpc import aio

from waystation import testing as t
from waystation.engine.engine import JobEngine
from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.server.app import RunningServer
from waystation.store import Store

Job = vs.Job
Req = vs.RunnerJobStreamRequest
ACTIVE = (Job.QUEUED, Job.WAITING, Job.RUNNING)


async def queue(vagrant: vs_grpc.VagrantAsyncStub, job: vs.Job) -> str:
    return (await vagrant.QueueJob(vs.QueueJobRequest(job=job))).job_id


async def make_targets(
    vagrant: vs_grpc.VagrantAsyncStub, count: int
) -> tuple[vs.Project, list[sdk.Ref.Target]]:
    """A basis, a project in it and `count` targets in that project."""
    basis = (await vagrant.UpsertBasis(vs.UpsertBasisRequest(basis=t.basis()))).basis
    project = (
        await vagrant.UpsertProject(vs.UpsertProjectRequest(project=t.project(t.basis_ref(basis))))
    ).project
    refs = []
    for _ in range(count):
        made = await vagrant.UpsertTarget(
            vs.UpsertTargetRequest(project=t.project_ref(project), target=t.target())
        )
        refs.append(sdk.Ref.Target(resource_id=made.target.resource_id))
    return project, refs


async def state_counts(vagrant: vs_grpc.VagrantAsyncStub) -> dict[str, int]:
    counts: dict[str, int] = defaultdict(int)
    for job in (await vagrant._ListJobs(vs.ListJobsRequest())).jobs:
        counts[Job.State.Name(job.state)] += 1
    return dict(counts)


@dataclass
class Pool:
    """Runners that loop: open a job stream, take a job, run it, complete, again.

    Each loop records what it got; once `expected` jobs completed, the loops
    still waiting for an assignment are told to stop.
    """

    expected: int
    hold: float = 0.0  # how long a runner "runs" each job
    got: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))
    # per job: (runner, scope key of the job's target, assignment received, complete sent)
    intervals: dict[str, tuple[str, str, float, float]] = field(default_factory=dict)
    completed: int = 0
    done: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self, fake: t.FakeRunner) -> None:
        runner_id = fake.runner.id
        while not self.done.is_set():
            stream = fake.job_stream()
            await stream.request()
            reading = asyncio.ensure_future(stream.call.read())
            stopping = asyncio.ensure_future(self.done.wait())
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not reading.done():  # everything ran: leave while waiting for work
                stream.cancel()
                reading.cancel()
                return
            response = reading.result()
            assert response.WhichOneof("event") == "assignment", response
            job = response.assignment.job
            received = time.monotonic()
            self.got[runner_id].append(job.id)
            await stream.send(ack=Req.Ack())
            await stream.output(f"{job.id} ran on {runner_id}")
            if self.hold:
                await asyncio.sleep(self.hold)
            # Taken before Complete is sent: the server frees the scope after it.
            finished = time.monotonic()
            await stream.complete()
            assert await stream.read() is aio.EOF  # type: ignore[attr-defined]
            self.intervals[job.id] = (runner_id, job.target.resource_id, received, finished)
            self.completed += 1
            if self.completed >= self.expected:
                self.done.set()


async def run_pool(pool: Pool, runners: list[t.FakeRunner], timeout: float) -> None:
    tasks = [asyncio.ensure_future(pool.run(r)) for r in runners]
    all_done = asyncio.ensure_future(pool.done.wait())
    try:
        # A loop that fails (an assertion) ends the wait at once.
        finished, _ = await asyncio.wait(
            [all_done, *tasks], timeout=timeout, return_when=asyncio.FIRST_COMPLETED
        )
        for task in finished:
            if task in tasks:
                task.result()  # raises what went wrong
        assert pool.done.is_set(), f"only {pool.completed}/{pool.expected} jobs ran in {timeout}s"
        await asyncio.wait_for(asyncio.gather(*tasks), timeout)
    finally:
        for task in (all_done, *tasks):
            task.cancel()
        await asyncio.gather(all_done, *tasks, return_exceptions=True)


async def start_runners(channel: aio.Channel, count: int, prefix: str) -> list[t.FakeRunner]:
    runners = [t.FakeRunner(channel, f"{prefix}-{i:02d}") for i in range(count)]
    await asyncio.gather(*(r.register() for r in runners))
    return runners


async def close_runners(runners: list[t.FakeRunner]) -> None:
    for fake in runners:
        await fake.close()


# -- many runners, many jobs -------------------------------------------------------


async def test_fifty_runners_run_a_thousand_jobs_each_once(
    vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    total, runner_count = 1000, 50
    runners = await start_runners(channel, runner_count, "load")
    try:
        # All queued up front, concurrently, before any runner asks for work.
        ids = await asyncio.gather(*(queue(vagrant, t.noop_job()) for _ in range(total)))
        assert len(set(ids)) == total
        assert await state_counts(vagrant) == {"QUEUED": total}

        pool = Pool(expected=total)
        await run_pool(pool, runners, timeout=100)

        taken = list(itertools.chain.from_iterable(pool.got.values()))
        assert len(taken) == len(set(taken)), "a job was assigned more than once"
        assert set(taken) == set(ids)
        assert sorted(pool.got) == sorted(r.runner.id for r in runners), "a runner got no job"

        jobs = (await vagrant._ListJobs(vs.ListJobsRequest())).jobs
        assert len(jobs) == total
        assert not [j.id for j in jobs if j.state in ACTIVE]
        assert {Job.State.Name(j.state) for j in jobs} == {"SUCCESS"}
        owner = {job_id: rid for rid, got in pool.got.items() for job_id in got}
        assert all(j.assigned_runner.id == owner[j.id] for j in jobs)
        # A few of them: the line their runner wrote was kept.
        for job_id in ids[:: total // 5]:
            events = await t.watch(vagrant, job_id)
            assert t.terminal_lines(events) == [f"{job_id} ran on {owner[job_id]}"]
    finally:
        await close_runners(runners)


# -- the serialization rule --------------------------------------------------------


def overlaps(a: tuple[float, float], b: tuple[float, float]) -> bool:
    return a[0] < b[1] and b[0] < a[1]


async def test_command_jobs_on_one_target_never_overlap(
    vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    _, (busy, other) = await make_targets(vagrant, 2)
    runners = await start_runners(channel, 4, "cmd")
    try:
        ids: dict[str, list[str]] = {busy.resource_id: [], other.resource_id: []}
        for i in range(10):  # interleaved, so both targets have work from the start
            ids[busy.resource_id].append(await queue(vagrant, t.command_job(busy, f"up {i}")))
            if i % 2 == 0:
                ids[other.resource_id].append(await queue(vagrant, t.command_job(other)))
        total = sum(len(v) for v in ids.values())

        pool = Pool(expected=total, hold=0.1)
        await run_pool(pool, runners, timeout=100)

        by_target: dict[str, list[tuple[float, float]]] = defaultdict(list)
        for job_id, (_, target_id, start, end) in pool.intervals.items():
            by_target[target_id].append((start, end))
            assert job_id in ids[target_id]
        assert {k: len(v) for k, v in by_target.items()} == {k: len(v) for k, v in ids.items()}
        for target_id, spans in by_target.items():
            spans.sort()
            for before, after in itertools.pairwise(spans):
                assert after[0] >= before[1], f"two commands overlapped on {target_id}"
        together = [
            (a, b)
            for a in by_target[busy.resource_id]
            for b in by_target[other.resource_id]
            if overlaps(a, b)
        ]
        assert together, "jobs on different targets never ran at the same time"

        taken = list(itertools.chain.from_iterable(pool.got.values()))
        assert sorted(taken) == sorted(pool.intervals)  # each assigned once
        assert await state_counts(vagrant) == {"SUCCESS": total}
    finally:
        await close_runners(runners)


async def test_a_running_command_blocks_commands_but_not_noops_on_its_target(
    vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    _, (target,) = await make_targets(vagrant, 1)
    first_runner, *idle_runners = await start_runners(channel, 3, "block")
    try:
        first = await queue(vagrant, t.command_job(target, "up"))
        holder = first_runner.job_stream()
        await holder.request()
        assert (await holder.assignment()).id == first
        await t.wait_for_state(vagrant, first, Job.WAITING)

        # Two idle runners wait for work; the second command must not reach them
        # while the first is assigned (WAITING), nor once it is RUNNING.
        idle = [r.job_stream() for r in idle_runners]
        for stream in idle:
            await stream.request()
        reads = {asyncio.ensure_future(s.call.read()): s for s in idle}
        blocked = await queue(vagrant, t.command_job(target, "halt"))
        done, _ = await asyncio.wait(reads, timeout=1.0)  # several poll intervals
        assert not done, [r.result() for r in done]
        assert (await vagrant.GetJob(vs.GetJobRequest(job_id=blocked))).state == Job.QUEUED
        await holder.send(ack=Req.Ack())
        await t.wait_for_state(vagrant, first, Job.RUNNING)
        done, _ = await asyncio.wait(reads, timeout=1.0)
        assert not done, [r.result() for r in done]
        assert (await vagrant.GetJob(vs.GetJobRequest(job_id=blocked))).state == Job.QUEUED

        # A Noop on the same target never blocks: an idle runner gets it meanwhile.
        noop = await queue(vagrant, t.noop_job(target=target))
        done, _ = await asyncio.wait(reads, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        assert len(done) == 1
        got = done.pop()
        response = got.result()
        assert response.WhichOneof("event") == "assignment", response
        assert response.assignment.job.id == noop
        noop_stream = reads.pop(got)
        await noop_stream.send(ack=Req.Ack())
        await t.wait_for_state(vagrant, noop, Job.RUNNING)
        await noop_stream.complete()
        await t.wait_for_state(vagrant, noop, Job.SUCCESS)

        # Still: the first command runs, the second waits, the other runner idles.
        done, _ = await asyncio.wait(reads, timeout=1.0)
        assert not done
        assert (await vagrant.GetJob(vs.GetJobRequest(job_id=first))).state == Job.RUNNING
        assert (await vagrant.GetJob(vs.GetJobRequest(job_id=blocked))).state == Job.QUEUED

        # The first one completes: the blocked one goes to the idle runner.
        await holder.complete()
        await t.wait_for_state(vagrant, first, Job.SUCCESS)
        (reading, last_stream) = next(iter(reads.items()))
        response = await asyncio.wait_for(reading, 30)
        assert response.WhichOneof("event") == "assignment", response
        assert response.assignment.job.id == blocked
        await last_stream.send(ack=Req.Ack())
        await t.wait_for_state(vagrant, blocked, Job.RUNNING)
        await last_stream.complete()
        await t.wait_for_state(vagrant, blocked, Job.SUCCESS)
        assert await state_counts(vagrant) == {"SUCCESS": 3}
    finally:
        await close_runners([first_runner, *idle_runners])


# -- idle runners --------------------------------------------------------------------


async def test_idle_runners_cost_no_database_work_until_a_job_comes(
    server: RunningServer, vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    """Waiting runners do not poll one by one (10,000 of them would be 5,000
    transactions a second): they look when woken, and the server's one poll per
    interval wakes them for work queued elsewhere."""
    runners = await start_runners(channel, 20, "idle")
    streams = [r.job_stream() for r in runners]
    assigns: list[str] = []
    store = server.store

    try:
        for stream in streams:
            await stream.request()
        deadline = time.monotonic() + 60
        while _waiting(server.engine) < len(streams):  # each parked after one look
            assert time.monotonic() < deadline, "runners never parked"
            await asyncio.sleep(0.05)
        for verb in ("job_assign_for_runner", "job_queue_and_hand"):
            _record(store, verb, assigns)
        await asyncio.sleep(server.engine.timeouts.poll * 6)
        assert assigns == []
        job_id = await queue(vagrant, t.noop_job())
        waiting = [asyncio.ensure_future(s.assignment(timeout=60)) for s in streams]
        done, pending = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        assert [task.result().id for task in done] == [job_id]
        # Handed to a waiting runner in the queue's own transaction; nobody else looked.
        assert assigns == ["job_queue_and_hand"], assigns
    finally:
        _unrecord(store)
        for stream in streams:
            stream.call.cancel()
        await close_runners(runners)


async def test_a_job_handed_to_a_runner_that_just_left_goes_back_to_the_queue(
    server: RunningServer, vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    """Queueing assigns to a waiting runner in the same transaction; if that runner's
    stream goes away while the transaction commits, the job is requeued at once (not
    at the ack timeout) and the next runner gets it."""
    leaving, staying = await start_runners(channel, 2, "hand")
    engine = server.engine
    stream = leaving.job_stream()
    store = server.store
    queue_and_hand = store.job_queue_and_hand
    try:
        await stream.request()
        deadline = time.monotonic() + 60
        while not _waiting(engine):
            assert time.monotonic() < deadline, "runner never parked"
            await asyncio.sleep(0.05)

        async def leave_first(*args: Any) -> Any:
            stream.call.cancel()
            gone_by = time.monotonic() + 60
            while _waiting(engine):  # its next_job has given up
                assert time.monotonic() < gone_by, "the stream never went away"
                await asyncio.sleep(0.01)
            return await queue_and_hand(*args)

        setattr(store, "job_queue_and_hand", leave_first)  # noqa: B010 (the seam)
        job_id = await queue(vagrant, t.noop_job())
        _unrecord(store)
        next_stream = staying.job_stream()
        taken = await next_stream.take(timeout=60)
        assert taken.id == job_id
        shown = await vagrant.GetJob(vs.GetJobRequest(job_id=job_id))
        assert shown.assigned_runner.id == staying.runner.id
        await next_stream.complete()
    finally:
        _unrecord(store)
        await close_runners([leaving, staying])


async def test_a_job_is_handed_at_queueing_only_to_a_runner_that_is_not_looking(
    server: RunningServer, vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    """A runner whose own assign transaction is in flight is not handed a job by
    a queue transaction: it would find a job itself and hand the other back (a
    queue-and-hand and a nack wasted, and the newer job run first). It is woken
    instead, and takes the oldest job."""
    (runner,) = await start_runners(channel, 1, "looking")
    store = server.store
    assign = store.job_assign_for_runner
    writes: list[str] = []
    looking, release = asyncio.Event(), asyncio.Event()

    async def hold_the_look(*args: Any) -> Any:
        writes.append("job_assign")
        looking.set()
        await release.wait()
        return await assign(*args)

    stream = runner.job_stream()
    try:
        first = await queue(vagrant, t.noop_job())
        for verb in ("job_queue_and_hand", "job_nack"):
            _record(store, verb, writes)
        setattr(store, "job_assign_for_runner", hold_the_look)  # noqa: B010 (the seam)
        await stream.request()
        await asyncio.wait_for(looking.wait(), 60)
        second = await queue(vagrant, t.noop_job())
        release.set()
        assert (await stream.assignment(timeout=60)).id == first
        await stream.send(ack=Req.Ack())
        await stream.complete()
        await stream.read(timeout=60)  # the end of the stream: the job is done
        assert "job_queue_and_hand" not in writes, writes
        assert "job_nack" not in writes, writes
        shown = await vagrant.GetJob(vs.GetJobRequest(job_id=second))
        assert shown.state == Job.QUEUED
    finally:
        _unrecord(store)
        stream.call.cancel()
        await close_runners([runner])


async def test_a_runner_with_nothing_to_do_parks_without_a_write_transaction(
    server: RunningServer, vagrant: vs_grpc.VagrantAsyncStub, channel: aio.Channel
) -> None:
    """Where reads are cheap (SQLite, on the event loop) a runner first reads
    whether anything fits it, and only then runs the assign transaction; where
    they are not (PostgreSQL), the assign transaction is the look."""
    runners = await start_runners(channel, 2, "look")
    writes: list[str] = []
    store = server.store
    _record(store, "job_assign_for_runner", writes)
    streams = [r.job_stream() for r in runners]
    try:
        await streams[0].request()
        deadline = time.monotonic() + 60
        while _waiting(server.engine) < 1:
            assert time.monotonic() < deadline, "runner never parked"
            await asyncio.sleep(0.05)
        looks = writes.count("job_assign_for_runner")
        assert looks == (0 if store.reads_inline else 1), writes
        # Work queued before a runner asks is still found by its look.
        _unrecord(store)
        first = await queue(vagrant, t.noop_job())
        assert (await streams[0].assignment(timeout=60)).id == first
        second = await queue(vagrant, t.noop_job())
        await streams[1].request()
        assert (await streams[1].assignment(timeout=60)).id == second
    finally:
        _unrecord(store)
        for stream in streams:
            stream.call.cancel()
        await close_runners(runners)


def _waiting(engine: JobEngine) -> int:
    """Runner streams parked in next_job on this server."""
    return engine.occupancy()[0]


def _record(store: Store, verb: str, names: list[str]) -> None:
    """Note each call of a store verb (the seam: the instance's attribute shadows the method)."""
    real = getattr(store, verb)

    def recorded(*args: Any, **kwargs: Any) -> Any:
        names.append(verb)
        return real(*args, **kwargs)

    setattr(store, verb, recorded)


def _unrecord(store: Store) -> None:
    """Every verb back to the store's own."""
    for name in [n for n in vars(store) if hasattr(type(store), n)]:
        delattr(store, name)
