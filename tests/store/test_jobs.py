"""Conformance of the job verbs (store/verbs/jobs.py): the runner job lifecycle,
its timers, pruning, and output."""

from __future__ import annotations

import pytest

from waystation import testing as t
from waystation.core.states import JobState
from waystation.errors import FailedPrecondition
from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store import Store
from waystation.store.jobs import CancelOutcome, Runner

from .conftest import ACK, HEARTBEAT, Reopen, noop_job, now_us

Job = vs.Job


def test_job_states_keep_the_numbers_vagrant_gives_them() -> None:
    """JobState's values are Job.State's, so rows written before it read the same
    and the Vagrant front end sends them as they are."""
    stored = {name: number for name, number in vs.Job.State.items() if name != "UNKNOWN"}
    assert {s.name: int(s) for s in JobState} == stored


async def test_queued_job_survives_a_restart(store: Store, reopen: Reopen) -> None:
    now = now_us()
    first = await store.job_queue(noop_job(), now, None)
    second = await store.job_queue(noop_job("r1"), now + 1, None)
    store = await reopen()
    assert (await store.job_get(first)).state == Job.QUEUED
    assert {j.id for j in await store.job_list()} == {first, second}
    assert (await store.job_queue_position(second))[0] >= 1
    assert await store.jobs_queued_runner_ids() == {None, "r1"}
    assert await store.job_assignable_exists("r1", True)
    assert not await store.job_assignable_exists("r2", True)


async def test_lifecycle_to_success_with_output_survives_a_restart(
    store: Store, reopen: Reopen
) -> None:
    job_id = await store.job_queue(noop_job(), now_us(), None)
    assigned = await store.job_assign_for_runner("R1", False, now_us(), ACK)
    assert assigned is not None and assigned.id == job_id
    assert assigned.assigned_runner.id == "R1"  # as registered
    assert await store.job_assign_for_runner("R2", False, now_us(), ACK) is None
    at = assigned.assign_time.ToMicroseconds()
    acked = await store.job_ack(job_id, "r1", at, now_us(), HEARTBEAT)
    assert acked.state == Job.RUNNING
    assert await store.job_heartbeat(job_id, "r1", now_us(), HEARTBEAT)
    batches = [t.lines_event(f"line {i}").SerializeToString() for i in range(3)]
    await store.output_append(job_id, 0, batches[:2])
    await store.output_append(job_id, 2, batches[2:])
    done = await store.job_complete(job_id, "r1", now_us(), None, None)
    assert done.state == Job.SUCCESS

    store = await reopen()
    assert (await store.job_get(job_id)).state == Job.SUCCESS
    assert await store.output_read(job_id) == list(enumerate(batches))
    assert await store.output_read(job_id, 1) == [(2, batches[2])]
    assert ("vagrant", "SUCCESS", 1) in await store.jobs_count_by_state()


async def test_nack_requeues_and_a_resume_needs_the_holder(store: Store) -> None:
    job_id = await store.job_queue(noop_job(), now_us(), None)
    assigned = await store.job_assign_for_runner("r1", False, now_us(), ACK)
    assert assigned is not None
    at = assigned.assign_time.ToMicroseconds()
    assert await store.job_nack(job_id, "r1", at)
    assert (await store.job_get(job_id)).state == Job.QUEUED
    assigned = await store.job_assign_for_runner("r1", False, now_us(), ACK)
    assert assigned is not None
    await store.job_ack(job_id, "r1", assigned.assign_time.ToMicroseconds(), now_us(), HEARTBEAT)
    resumed = await store.job_resume(job_id, "r1", now_us(), HEARTBEAT)
    assert resumed.state == Job.RUNNING
    with pytest.raises(FailedPrecondition):
        await store.job_resume(job_id, "r2", now_us(), HEARTBEAT)


async def test_queue_and_hand_assigns_in_the_same_transaction(store: Store) -> None:
    job_id, handed = await store.job_queue_and_hand(
        noop_job(), now_us(), None, Runner("Hand", False), ACK
    )
    assert handed is not None and handed.id == job_id
    assert handed.state == Job.WAITING
    assert (await store.job_get(job_id)).assigned_runner.id == "Hand"


async def test_cancel_is_durable(store: Store, reopen: Reopen) -> None:
    job_id = await store.job_queue(noop_job(), now_us(), None)
    assert await store.job_cancel(job_id, now_us()) is CancelOutcome.ENDED
    assert await store.job_cancel(job_id, now_us()) is CancelOutcome.NOTHING
    store = await reopen()
    assert (await store.job_get(job_id)).state == Job.ERROR


async def test_timers_fire_after_a_restart(store: Store, reopen: Reopen) -> None:
    now = now_us()
    expiring = await store.job_queue(noop_job("nobody"), now, 1_000)
    waiting = await store.job_queue(noop_job(), now, None)
    assert await store.job_assign_for_runner("r1", False, now, ACK) is not None
    store = await reopen()
    deadline = await store.jobs_next_deadline()
    assert deadline == now + 1_000
    fired = await store.jobs_fire_timers(now + ACK + 1, 300.0)
    assert fired.expired == [expiring]
    assert fired.requeued == [waiting]
    assert (await store.job_get(waiting)).state == Job.QUEUED
    assert (await store.job_get(expiring)).state == Job.ERROR


async def test_prune_keeps_the_newest_finished_jobs(store: Store) -> None:
    ids = [await store.job_queue(noop_job(), now_us() + i, None) for i in range(3)]
    for job_id in ids:
        await store.job_cancel(job_id, now_us())
    assert await store.jobs_prune(1) == 2
    assert len(await store.job_list()) == 1


async def test_output_of_a_scope(store: Store) -> None:
    basis = await store.basis_upsert(t.basis())
    project = await store.project_upsert(t.project(t.basis_ref(basis)))
    project_ref = t.project_ref(project)
    target = await store.target_upsert(project_ref, t.target("box"))
    target_ref = sdk.Ref.Target(resource_id=target.resource_id, name="box", project=project_ref)
    job_id = await store.job_queue(t.command_job(target_ref), now_us(), None)
    assigned = await store.job_assign_for_runner("r1", False, now_us(), ACK)
    assert assigned is not None
    await store.job_ack(job_id, "r1", assigned.assign_time.ToMicroseconds(), now_us(), HEARTBEAT)
    data = t.lines_event("hello").SerializeToString()
    await store.output_append(job_id, 0, [data])
    rows = await store.output_for_scope("project", project_ref, {}, None)
    assert rows == [(job_id, 0, data)]
    assert await store.output_for_scope("project", project_ref, {job_id: 0}, None) == []
