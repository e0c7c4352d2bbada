"""The job engine: queueing, assignment, timers and watching.

One lifecycle for jobs of every kind (core.states: JobState, JobKind): the
database decides (every transition is a store transaction; taking a job and
every ending go through store.lifecycle); this module decides *when* to ask
it. Not yet protocol-free: it still takes and gives Vagrant and provisionerd
messages (issue #20, item 1).

- Assignment: a runner waiting for work parks a Waiter. Queueing a job while
  a fitting waiter sleeps (parked, not running an assign of its own) assigns
  to it in the queue's own transaction and hands it the job; otherwise a
  waiter woken later runs the assign transaction, and one that got a job
  wakes the next, so a burst of jobs spreads over idle runners. Every poll
  interval one query finds work queued (or freed) by other replicas and
  wakes fitting waiters; waiters never poll on their own.
- Provisioner daemons park a DaemonWaiter the same way (`acquire`); their jobs
  (store.provisioner_jobs) share the jobs table, states, cancel and timers.
- Timers: ack, liveness (heartbeat or hang) and expiry deadlines are columns;
  one loop sleeps until the earliest and fires everything due, of every kind,
  in one transaction, after a restart too.
- Watching: the Feed wakes followers of a job; OutputLogs share output.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any

from google.rpc import status_pb2

from waystation.core.roles import Actor
from waystation.core.states import SERIALIZED_OPERATIONS
from waystation.core.timeouts import Timeouts, now_us, to_us
from waystation.engine.feed import CONFIG_TOPIC, OUTPUT_TOPIC, Feed, job_topic, output_topic, wait
from waystation.engine.output import OutputLog, OutputWriter, Terminal
from waystation.errors import FailedPrecondition, Unavailable
from waystation.metrics import Metrics
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.store import Store
from waystation.store import jobs as job_tx
from waystation.store import provisioner_queue as pq
from waystation.store.provisioner_queue import Daemon, Queued

log = logging.getLogger(__name__)

Recheck = Callable[[], Awaitable[None]]


@dataclass(eq=False)
class Waiter:
    runner_id: str  # lowercased
    by_id_only: bool
    registered_id: str  # as the runner registered it: what its jobs say on the wire
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    parked: bool = True  # False once next_job has returned or given up
    sleeping: bool = False  # in wake.wait(), not looking at the queue itself
    reserved: bool = False  # a queue transaction is assigning to it right now
    handed: vs.Job | None = None  # assigned by a queue transaction, not yet taken


@dataclass(eq=False)
class DaemonWaiter:
    daemon: Daemon
    wake: asyncio.Event = field(default_factory=asyncio.Event)


class JobEngine:
    def __init__(self, store: Store, timeouts: Timeouts | None = None) -> None:
        self.store = store
        self.timeouts = timeouts or Timeouts()
        self.feed = Feed()
        self._waiters: list[Waiter] = []
        self._daemon_waiters: list[DaemonWaiter] = []
        self._logs: dict[str, OutputLog] = {}
        self._attached: dict[str, _Attachment] = {}  # job id -> its runner stream here
        self._connected: dict[str, int] = {}  # runner id -> open config streams here
        self._timer_wake = asyncio.Event()
        self._next_timer: float | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._background: set[asyncio.Future[Any]] = set()
        self._draining = False
        self._stopped = False
        self.metrics = Metrics()

    # -- lifecycle -----------------------------------------------------------

    async def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._timer_loop(), name="engine-timers"),
            asyncio.create_task(self._housekeeping_loop(), name="engine-housekeeping"),
            asyncio.create_task(self._prune_loop(), name="engine-prune"),
        ]

    def drain(self) -> None:
        """Shutting down: hand out no more work; waiting runners are sent away.

        Jobs already running may still report (output, heartbeats, results)
        during the server's grace period. Timers stop: the next server (or
        another replica) fires whatever falls due meanwhile.
        """
        self._draining = True
        for task in self._tasks:
            task.cancel()
        for waiter in self._waiters:
            waiter.wake.set()
        for daemon_waiter in self._daemon_waiters:
            daemon_waiter.wake.set()
        self.feed.publish(CONFIG_TOPIC)  # config streams see `draining` and end

    @property
    def draining(self) -> bool:
        return self._draining

    async def stop(self) -> None:
        self.drain()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks = []
        # Writes started by streams that just ended finish before the store closes.
        await asyncio.gather(*self._background, return_exceptions=True)
        self._stopped = True

    # -- queue ---------------------------------------------------------------

    async def queue(self, job: vs.Job, expires_in: float | None) -> str:
        """Persist the job; a runner already waiting for it gets it in the same
        commit (one transaction and no wake-up round trip, the common case)."""
        expiry = to_us(expires_in) if expires_in is not None else None
        runner = job.target_runner.id.id.lower() if job.target_runner.HasField("id") else None
        waiter = self._idle_waiter(runner, sleeping_only=True)
        handed: vs.Job | None = None
        if waiter is None:
            job_id = await self.store.job_queue(job, now_us(), expiry)
        else:
            waiter.reserved = True
            try:
                job_id, handed = await self.store.job_queue_and_hand(
                    job,
                    now_us(),
                    expiry,
                    job_tx.Runner(waiter.registered_id, waiter.by_id_only),
                    to_us(self.timeouts.ack),
                )
            finally:
                waiter.reserved = False
            if handed is not None:
                self._hand(waiter, handed)
        if handed is None or handed.id != job_id:
            self._wake_for(runner)  # the new job still waits
        if expires_in is not None:
            self._arm(expires_in)
        return job_id

    def _hand(self, waiter: Waiter, job: vs.Job) -> None:
        self._arm(self.timeouts.ack)
        self.feed.publish(job_topic(job.id))
        if waiter.parked and waiter.handed is None:
            waiter.handed = job
            waiter.wake.set()
        else:  # its stream went away while the transaction committed
            self._spawn(self.nack(job, waiter.runner_id))

    async def cancel(
        self, job_id: str, kind: str = job_tx.VAGRANT, actor: Actor | None = None
    ) -> job_tx.CancelOutcome:
        """Cancel a job; `actor` (the caller, None with auth off) is audited with it."""
        outcome = await self.store.job_cancel(job_id, now_us(), kind, actor)
        if outcome is not job_tx.CancelOutcome.NOTHING:
            self.feed.publish(job_topic(job_id))
        if outcome is job_tx.CancelOutcome.FORCED:
            self._wake_from_db_soon()  # its scope is free
        return outcome

    async def get(self, job_id: str) -> vs.Job:
        return await self.store.job_get(job_id)

    async def list(self) -> list[vs.Job]:
        return await self.store.job_list()

    async def prune(self, keep: int, actor: Actor | None = None) -> int:
        return await self.store.jobs_prune(keep, actor, now_us())

    async def assignable(self, job: vs.Job) -> bool:
        runner = job.target_runner.id.id if job.target_runner.HasField("id") else None
        return await self.store.runner_assignable(runner, now_us())

    # -- runners -------------------------------------------------------------

    async def runner_connected(self, runner: vs.Runner) -> None:
        lease = to_us(self.timeouts.runner_lease)
        await self.store.runner_register(runner, now_us(), lease)
        rid = runner.id.lower()
        self._connected[rid] = self._connected.get(rid, 0) + 1

    def runner_disconnected(self, runner_id: str) -> None:
        """A config stream closed; the last one marks the runner offline (in the background,
        as the stream's task may be being cancelled)."""
        rid = runner_id.lower()
        self._connected[rid] -= 1
        if self._connected[rid] <= 0:
            del self._connected[rid]
            if not self._stopped:  # else the store is closing; the lease runs out instead
                self._spawn(self.store.runner_offline(rid, now_us()))

    async def config_changed(self) -> None:
        self.feed.publish(CONFIG_TOPIC)

    async def next_job(self, runner: vs.Runner, recheck: Recheck | None = None) -> vs.Job:
        """Block until a job is assigned to this runner (it is then WAITING).

        `recheck` (the caller's credentials) runs before each look after the
        first: a runner whose token was revoked while it waited gets nothing."""
        waiter = Waiter(runner.id.lower(), runner.by_id_only, runner.id)
        self._waiters.append(waiter)
        ack_timeout = to_us(self.timeouts.ack)
        first = True
        try:
            while True:
                if self._draining:
                    raise Unavailable("the server is shutting down; reconnect to another")
                if recheck is not None and not first:
                    await recheck()
                first = False
                if waiter.handed is not None:  # assigned as it was queued (see queue)
                    handed, waiter.handed = waiter.handed, None
                    self._assigned(job_tx.VAGRANT, handed.queue_time.ToMicroseconds())
                    return handed
                waiter.wake.clear()  # before looking, so no wake-up is lost
                if self.store.reads_inline and not await self.store.job_assignable_exists(
                    waiter.runner_id, waiter.by_id_only
                ):
                    # Nothing to take: park without a write. (Where reads are
                    # not this cheap, the assign transaction is the look.)
                    await _sleep(waiter)
                    continue
                assigning = asyncio.ensure_future(
                    self.store.job_assign_for_runner(
                        waiter.registered_id,
                        waiter.by_id_only,
                        now_us(),
                        ack_timeout,
                    )
                )
                try:
                    job = await asyncio.shield(assigning)
                except asyncio.CancelledError:
                    # The stream went away while the assignment was committing: hand
                    # back whatever it got, at once, instead of at the ack timeout.
                    assigning.add_done_callback(self._return_unclaimed(runner.id))
                    raise
                if job is not None:
                    self._assigned(job_tx.VAGRANT, job.queue_time.ToMicroseconds())
                    self._arm(self.timeouts.ack)
                    self.feed.publish(job_topic(job.id))
                    self._wake_for(None)  # there may be more: pass it on
                    return job
                # No poll of its own: the housekeeping poll looks for work queued
                # elsewhere once for all waiters, so 10,000 idle runners cost nothing.
                await _sleep(waiter)
        finally:
            waiter.parked = False
            self._waiters.remove(waiter)
            if waiter.handed is not None:  # handed, never taken: back to the queue
                self._spawn(self.nack(waiter.handed, runner.id))

    def _assigned(self, kind: str, queued_us: int) -> None:
        wait = (now_us() - queued_us) / 1e6
        self.metrics.assign_wait.labels(kind).observe(max(wait, 0.0))

    def occupancy(self) -> tuple[int, int, int]:
        """Runner streams waiting for a job, daemons waiting to acquire one, and
        runners with a config stream open, on this server."""
        return len(self._waiters), len(self._daemon_waiters), len(self._connected)

    def _return_unclaimed(self, runner_id: str) -> Callable[[asyncio.Future[Any]], None]:
        def done(assigning: asyncio.Future[Any]) -> None:
            if assigning.cancelled() or assigning.exception() is not None:
                return
            job = assigning.result()
            if job is not None:
                self._spawn(self.nack(job, runner_id))

        return done

    async def ack(self, job: vs.Job, runner_id: str) -> vs.Job:
        """WAITING -> RUNNING, if `job` (as assigned) is still this runner's."""
        assigned_at = job.assign_time.ToMicroseconds()
        heartbeat = to_us(self.timeouts.heartbeat)
        acked = await self.store.job_ack(job.id, runner_id, assigned_at, now_us(), heartbeat)
        self._arm(self.timeouts.heartbeat)
        self.feed.publish(job_topic(job.id))
        return acked

    async def resume(self, job_id: str, runner_id: str) -> vs.Job:
        """A runner's new stream carries on with its RUNNING job (FAILED_PRECONDITION
        if the job is not that): its heartbeat deadline starts over."""
        if self._draining:
            raise Unavailable("the server is shutting down; resume on another")
        heartbeat = to_us(self.timeouts.heartbeat)
        job = await self.store.job_resume(job_id, runner_id, now_us(), heartbeat)
        self._arm(self.timeouts.heartbeat)
        return job

    @contextlib.asynccontextmanager
    async def attached(self, job_id: str, detach: Callable[[], None]) -> AsyncIterator[bool]:
        """A runner stream carries the job on this server. A resumed stream takes
        over from a stale one (its runner lost it, we did not notice yet): the old
        one is told to let go and waited for, so that one writer at a time appends
        the job's output and the count of events it holds is exact. Yields whether
        it took over (the job may have changed meanwhile)."""
        took_over = False
        while (old := self._attached.get(job_id)) is not None:
            old.detach()
            await old.gone.wait()
            took_over = True
        mine = _Attachment(detach)
        self._attached[job_id] = mine
        try:
            yield took_over
        finally:
            del self._attached[job_id]
            mine.gone.set()

    async def nack(self, job: vs.Job, runner_id: str) -> None:
        assigned_at = job.assign_time.ToMicroseconds()
        if await self.store.job_nack(job.id, runner_id, assigned_at):
            self.feed.publish(job_topic(job.id))
            self._wake_for(None)
            self._wake_from_db_soon()

    async def heartbeat(self, job_id: str, runner_id: str) -> bool:
        return await self.store.job_heartbeat(
            job_id, runner_id, now_us(), to_us(self.timeouts.heartbeat)
        )

    async def complete(
        self,
        job_id: str,
        runner_id: str,
        result: vs.Job.Result | None = None,
        error: status_pb2.Status | None = None,
    ) -> vs.Job:
        job = await self.store.job_complete(job_id, runner_id, now_us(), result, error)
        self.feed.publish(job_topic(job_id))
        if job.WhichOneof("operation") in SERIALIZED_OPERATIONS:
            self._wake_from_db_soon()  # jobs blocked on its scope may go now
        return job

    # -- provisioner daemons ---------------------------------------------------

    # Queueing a provisioner job: the store verb, then the wake-up of a daemon
    # that fits it, here (one forgotten wake-up would leave the job to the poll).

    async def template_push(
        self, request: pv.PushTemplateRequest, archive_hash: str, actor: Actor | None = None
    ) -> tuple[pv.Template, pv.TemplateVersion]:
        """A new template version; its import job is queued and a daemon woken."""
        template, version, queued = await self.store.template_push(
            request, archive_hash, now_us(), actor
        )
        self._provisioner_queued(queued)
        return template, version

    async def workspace_create(
        self, request: pv.CreateWorkspaceRequest, actor: Actor | None = None
    ) -> tuple[pv.Workspace, pv.WorkspaceBuild]:
        """A new workspace; its first build is queued and a daemon woken."""
        workspace, build, queued = await self.store.workspace_create(request, now_us(), actor)
        self._provisioner_queued(queued)
        return workspace, build

    async def workspace_build(
        self, request: pv.BuildWorkspaceRequest, actor: Actor | None = None
    ) -> tuple[pv.Workspace, pv.WorkspaceBuild]:
        """A build of a workspace, queued, and a daemon woken."""
        workspace, build, queued = await self.store.workspace_build(request, now_us(), actor)
        self._provisioner_queued(queued)
        return workspace, build

    async def template_dry_run(self, request: pv.DryRunRequest) -> str:
        """A plan-only job, queued, and a daemon woken; its id."""
        job_id, queued = await self.store.template_dry_run(request, now_us())
        self._provisioner_queued(queued)
        return job_id

    def _provisioner_queued(self, queued: Queued) -> None:
        self._wake_daemon(queued.provisioner, queued.tags)

    async def acquire(
        self,
        daemon: Daemon,
        stop: asyncio.Event,
        timeout: float | None = None,
        recheck: Recheck | None = None,
    ) -> pd.AcquiredJob | None:
        """Block until a job fits this daemon (it is then RUNNING, held by the
        daemon), `stop` is set, the timeout passes or the server drains: None.
        `recheck` as for next_job."""
        waiter = DaemonWaiter(daemon)
        first = True
        self._daemon_waiters.append(waiter)
        hang = to_us(self.timeouts.provisioner_hang)
        lease = to_us(self.timeouts.runner_lease)
        loop = asyncio.get_running_loop()
        give_up = loop.time() + timeout if timeout is not None else None
        try:
            while not stop.is_set() and not self._draining:
                if recheck is not None and not first:
                    await recheck()
                first = False
                waiter.wake.clear()
                acquiring = asyncio.ensure_future(
                    self.store.provisioner_job_acquire(daemon, now_us(), hang, lease)
                )
                try:
                    job, failed = await asyncio.shield(acquiring)
                except asyncio.CancelledError:
                    # The call went away while the lock was committing: the job
                    # cannot reach its daemon (upstream fails it).
                    acquiring.add_done_callback(self._broken(daemon.id))
                    raise
                for job_id in failed:
                    self.feed.publish(job_topic(job_id))
                if job is not None:
                    self._assigned(pq.KIND, job.created_at * 1000)
                    self._arm(self.timeouts.provisioner_hang)
                    self.feed.publish(job_topic(job.job_id))
                    self._wake_daemon(None, {})  # there may be more: pass it on
                    return job
                delay = None  # woken as runners are (see next_job)
                if give_up is not None:
                    delay = give_up - loop.time()
                    if delay <= 0:
                        return None
                await _wait_any(delay, waiter.wake, stop)
            return None
        finally:
            self._daemon_waiters.remove(waiter)

    def _broken(self, daemon_id: str) -> Callable[[asyncio.Future[Any]], None]:
        def done(acquiring: asyncio.Future[Any]) -> None:
            if acquiring.cancelled() or acquiring.exception() is not None:
                return
            job, _ = acquiring.result()
            if job is not None:
                self._spawn(self.provisioner_broken(job.job_id, daemon_id))

        return done

    async def daemon_left(self, daemon_id: str) -> None:
        """The daemon said goodbye (CancelAcquire): not connected any more."""
        await self.store.daemon_left(daemon_id, now_us())

    async def provisioner_broken(self, job_id: str, daemon_id: str) -> None:
        if await self.store.provisioner_job_broken(job_id, daemon_id, now_us()):
            self.feed.publish(job_topic(job_id))

    async def provisioner_update(
        self, daemon_id: str, request: pd.UpdateJobRequest
    ) -> pd.UpdateJobResponse:
        hang = self.timeouts.provisioner_hang
        updated = await self.store.provisioner_job_update(daemon_id, request, now_us(), to_us(hang))
        self._arm(hang)
        if updated.logged:
            self.feed.publish(output_topic(request.job_id))
        if updated.error is not None:
            raise FailedPrecondition(updated.error)
        return updated.response

    async def commit_quota(
        self, daemon_id: str, request: pd.CommitQuotaRequest
    ) -> pd.CommitQuotaResponse:
        hang = to_us(self.timeouts.provisioner_hang)
        return await self.store.quota_commit(daemon_id, request, now_us(), hang)

    async def provisioner_complete(self, daemon_id: str, completed: pd.CompletedJob) -> None:
        await self.store.provisioner_job_complete(daemon_id, completed, now_us())
        self.feed.publish(job_topic(completed.job_id))

    async def provisioner_fail(self, daemon_id: str, failed: pd.FailedJob) -> None:
        await self.store.provisioner_job_fail(daemon_id, failed, now_us())
        self.feed.publish(job_topic(failed.job_id))

    # -- output --------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def output(self, job_id: str, *, load: bool = True) -> AsyncIterator[OutputLog]:
        """The job's shared output log, loaded from the store on first use."""
        output = self._logs.get(job_id)
        fresh = output is None
        if output is None:
            output = OutputLog(job_id, 0)
            self._logs[job_id] = output
        output.refs += 1
        try:
            if load:
                await output.refresh(self.store, backlog=fresh)
            yield output
        finally:
            output.refs -= 1
            if output.refs == 0:
                del self._logs[job_id]

    @contextlib.asynccontextmanager
    async def output_writer(
        self, job_id: str, *, resume: bool = False
    ) -> AsyncIterator[OutputAppender]:
        """The appender of a runner stream attached to the job (see `attached`).
        A job's output starts after its ack, so an acked stream has nothing to
        load; a resumed one loads what is persisted (and only that: the writer
        before it flushed when it let go) and counts its events."""
        async with self.output(job_id, load=resume) as output:
            output.local_writer = True
            writer = OutputWriter(self.store, output)
            appender = OutputAppender(self, output, writer)
            if resume:
                appender.events = sum(len(batch.events) for batch in output.batches)
            try:
                yield appender
            finally:
                await writer.flush()
                output.local_writer = False

    # -- loops ---------------------------------------------------------------

    def _arm(self, delay: float) -> None:
        """A deadline `delay` seconds from now exists: wake the timer loop in time."""
        loop = asyncio.get_running_loop()
        due = loop.time() + delay
        if self._next_timer is None or due < self._next_timer:
            self._next_timer = due
            self._timer_wake.set()

    async def _timer_loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self._fire_timers()
                deadline = await self.store.jobs_next_deadline()
            except Exception:
                log.exception("timer pass failed; retrying")
                deadline = None
            delay = self.timeouts.poll
            if deadline is not None:
                delay = min(delay, max(0.0, (deadline - now_us()) / 1e6) + 0.001)
            self._next_timer = loop.time() + delay
            self._timer_wake.clear()
            await wait(self._timer_wake, delay)
            self._next_timer = None

    async def _fire_timers(self) -> None:
        fired = await self.store.jobs_fire_timers(now_us(), self.timeouts.provisioner_hang)
        if not fired:
            return
        for job_id in (*fired.expired, *fired.requeued, *fired.timed_out):
            self.feed.publish(job_topic(job_id))
        if fired.requeued or fired.timed_out or fired.expired:
            await self._wake_from_db()
        if fired.hung:
            for job_id in fired.hung:
                self.feed.publish(job_topic(job_id))
                self.feed.publish(output_topic(job_id))
            log.warning(
                "provisioner jobs failed as hung: %s",
                ", ".join(fired.hung),
                extra={"job_ids": list(fired.hung)},
            )
        if fired.timed_out:
            log.warning(
                "jobs ended by the heartbeat timeout: %s",
                ", ".join(fired.timed_out),
                extra={"job_ids": list(fired.timed_out)},  # a JSON log's field
            )
        if fired.requeued:
            log.info(
                "jobs requeued after the ack timeout: %s",
                ", ".join(fired.requeued),
                extra={"job_ids": list(fired.requeued)},
            )

    async def _housekeeping_loop(self) -> None:
        loop = asyncio.get_running_loop()
        renewed = loop.time()
        while True:
            await asyncio.sleep(self.timeouts.poll)
            try:
                # A lease is renewed well before it runs out, not on every poll:
                # with 10,000 runners each renewal writes 10,000 rows.
                if loop.time() - renewed >= self.timeouts.runner_lease / 4:
                    renewed = loop.time()
                    await self._renew_leases()
                if self._waiters:
                    await self._wake_from_db()
                if self._daemon_waiters:
                    await self._wake_daemons_from_db()
            except Exception:
                log.exception("housekeeping pass failed")

    async def _renew_leases(self) -> None:
        """Connected runners and parked daemons stay online another lease. (A
        daemon's lease is also renewed each time it acquires or updates a job.)"""
        lease, now = to_us(self.timeouts.runner_lease), now_us()
        if self._connected:
            await self.store.runners_renew(list(self._connected), now, lease)
        parked = {w.daemon.id for w in self._daemon_waiters}
        if parked:
            await self.store.daemons_renew(parked, now, lease)

    async def _prune_loop(self) -> None:
        while True:
            await asyncio.sleep(self.timeouts.prune_interval)
            try:
                pruned = await self.prune(self.timeouts.prune_keep)
                if pruned:
                    log.info("pruned %d old jobs", pruned)
            except Exception:
                log.exception("background prune failed")

    # -- wake-ups ------------------------------------------------------------

    def _idle_waiter(self, runner_id: str | None, *, sleeping_only: bool = False) -> Waiter | None:
        """An idle waiter that may take a job aimed at `runner_id` (None: any):
        one asleep if any. One that is looking (its assign transaction in flight)
        may have looked too early, so a wake-up still goes to it if none sleeps;
        but a job is only handed to one asleep, or the job it finds itself would
        make the handed one go back (a wasted transaction each way)."""
        looking = None
        for waiter in self._waiters:
            if waiter.wake.is_set() or waiter.reserved or waiter.handed is not None:
                continue
            if waiter.runner_id == runner_id or (runner_id is None and not waiter.by_id_only):
                if waiter.sleeping:
                    return waiter
                if looking is None and not sleeping_only:
                    looking = waiter
        return looking

    def _wake_for(self, runner_id: str | None) -> None:
        """Wake one idle waiter that may take a job aimed at `runner_id` (None: any)."""
        waiter = self._idle_waiter(runner_id)
        if waiter is not None:
            waiter.wake.set()

    async def _wake_from_db(self) -> None:
        """Wake waiters for whatever is queued: after a scope frees, and on polls."""
        if not self._waiters:
            return
        for runner_id in await self.store.jobs_queued_runner_ids():
            self._wake_for(runner_id)

    def _wake_daemon(self, provisioner: str | None, tags: Mapping[str, str]) -> None:
        """Wake one idle daemon that may take a job of `provisioner` (None: any job)."""
        for waiter in self._daemon_waiters:
            if waiter.wake.is_set():
                continue
            if provisioner is None or waiter.daemon.fits(provisioner, tags):
                waiter.wake.set()
                return

    async def _wake_daemons_from_db(self) -> None:
        """The poll: parked daemons look at work queued elsewhere."""
        for provisioner, tags in await self.store.provisioner_jobs_queued_kinds():
            for waiter in self._daemon_waiters:
                if not waiter.wake.is_set() and waiter.daemon.fits(provisioner, tags):
                    waiter.wake.set()

    def _wake_from_db_soon(self) -> None:
        if self._waiters:
            self._spawn(self._wake_from_db())

    def _spawn(self, work: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)


# Watchers of a job that writes fast wake at most this often: each wake-up
# costs every watcher a message, and what arrives in between is sent merged.
# A lone line still goes out at once.
OUTPUT_WAKE_SECONDS = 0.025


@dataclass(eq=False)
class _Attachment:
    detach: Callable[[], None]
    gone: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass
class OutputAppender:
    """What a runner stream uses to add output to its job."""

    engine: JobEngine
    output: OutputLog
    writer: OutputWriter
    events: int = 0  # on a resumed stream: the events persisted before it
    _woke_at: float = -math.inf
    _pending: asyncio.TimerHandle | None = None

    def append(self, batch: Terminal) -> None:
        self.output.append(batch)
        self.writer.notify()
        if self._pending is not None:
            return  # a wake-up is due; it will carry this batch too
        loop = asyncio.get_running_loop()
        delay = self._woke_at + OUTPUT_WAKE_SECONDS - loop.time()
        if delay <= 0:
            self._wake()
        else:
            self._pending = loop.call_later(delay, self._wake)

    def _wake(self) -> None:
        self._pending = None
        self._woke_at = asyncio.get_running_loop().time()
        self.engine.feed.publish(output_topic(self.output.job_id))
        self.engine.feed.publish(OUTPUT_TOPIC)

    async def flush(self) -> None:
        if self._pending is not None:  # the job is about to end: no one waits
            self._pending.cancel()
            self._wake()
        await self.writer.flush()


async def _wait_any(seconds: float | None, *events: asyncio.Event) -> None:
    """Wait until any of `events` is set, at most `seconds` (None: no limit)."""
    waits = [asyncio.ensure_future(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("background wake-up failed", exc_info=task.exception())


async def _sleep(waiter: Waiter) -> None:
    waiter.sleeping = True
    try:
        await waiter.wake.wait()
    finally:
        waiter.sleeping = False
