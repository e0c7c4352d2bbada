"""A provisioner daemon speaking provisionerd.ProvisionerDaemon (run.py makes it a process).

The loop: AcquireJobWithCancel (one job, or an empty answer when we cancel
the wait), run the job with the provisioner it names, report CompleteJob or
FailJob, repeat. While a job runs, UpdateJob carries its logs (flushed 250 ms
after the first queued line, or at once at 100) and is the heartbeat (every
5 s when nothing else was sent); its `canceled` answer cancels the
provisioner gracefully, and after a grace period for good.

The daemon's id, provisioner types and tags travel as gRPC metadata on every
call (keys in waystation.core.wire). Ownership of a job is by id, so
after the server restarts or the network drops, the same daemon keeps
reporting on its job: every report is retried while the server is away.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import shutil
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc
from grpc import aio

from waystation.client import Connection, reconnect_pause
from waystation.core.wire import DAEMON_ID, DAEMON_PROVISIONER, DAEMON_TAG
from waystation.errors import InvalidArgument
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.provisionerd.proto import provisionerd_pb2_grpc as pd_grpc
from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.provisioner import archive
from waystation.provisioner.base import Provisioner, Session

log = logging.getLogger(__name__)
T = TypeVar("T")

# Upstream's stage names, as users know them from Coder's build logs.
SETTING_UP = "Setting up"
PARSING = "Parsing template parameters"
DETECTING_START = "Detecting persistent resources"
DETECTING_STOP = "Detecting ephemeral resources"
PLANNING = "Planning infrastructure"
COMMIT_QUOTA = "Commit quota"
APPLYING = {
    sdk.START: "Starting workspace",
    sdk.STOP: "Stopping workspace",
    sdk.DESTROY: "Destroying workspace",
}
CLEANING_UP = "Cleaning Up"

# Answers after which reporting on a job is pointless: it is not ours any more.
GONE = (grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.PERMISSION_DENIED)
JOB_GONE_MESSAGES = ("job already completed", "you don't own this job", "job isn't running yet")
RETRYABLE = (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED)


@dataclass
class DaemonSettings:
    address: str
    daemon_id: str
    provisioners: list[str]
    tags: dict[str, str] = field(default_factory=dict)
    work_dir: Path | None = None  # where jobs unpack templates (a temp dir by default)
    heartbeat: float = 5.0  # UpdateJob this often when nothing else was sent
    log_debounce: float = 0.25  # send queued logs this long after the first...
    log_batch: int = 100  # ...or at once when this many are queued
    cancel_grace: float = 60.0  # after a cancel, how long the provisioner may take to stop
    backoff_max: float = 30.0
    max_jobs: int | None = None  # stop after this many jobs (tests, burst mode)
    token: str = ""
    tls: bool = False
    tls_ca: str = ""
    tls_skip_verify: bool = False

    def connection(self) -> Connection:
        return Connection(self.address, self.token, self.tls, self.tls_ca, self.tls_skip_verify)

    def metadata(self) -> list[tuple[str, str]]:
        md = [(DAEMON_ID, self.daemon_id)]
        md += [(DAEMON_PROVISIONER, p) for p in self.provisioners]
        md += [(DAEMON_TAG, f"{k}={v}") for k, v in sorted(self.tags.items())]
        return md


class JobGone(Exception):
    """The server no longer lets us report on the job (cancelled for good, or hung)."""


@dataclass
class ProvisionerDaemon:
    settings: DaemonSettings
    provisioners: dict[str, Provisioner]
    jobs_done: int = 0
    current: JobRun | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    def stop(self, *, now: bool = False) -> None:
        """Take no more jobs; the one in hand finishes (or, with `now`, is cancelled)."""
        self._stop.set()
        if now and self.current is not None:
            self.current.cancel("the provisioner daemon is shutting down")

    async def run(self) -> None:
        delay = 0.5
        while not self._stop.is_set() and not self._quota_reached():
            try:
                async with self.settings.connection().aio_channel() as channel:
                    stub = pd_grpc.ProvisionerDaemonStub(channel)
                    await self._serve(stub)
                    delay = 0.5
            except aio.AioRpcError as exc:
                if exc.code() not in (*RETRYABLE, grpc.StatusCode.CANCELLED):
                    log.error("server refused the daemon: %s: %s", exc.code().name, exc.details())
                    raise
                delay = await reconnect_pause(
                    exc.code().name, delay, self._stop, self.settings.backoff_max
                )

    def _quota_reached(self) -> bool:
        return self.settings.max_jobs is not None and self.jobs_done >= self.settings.max_jobs

    async def _serve(self, stub: Any) -> None:
        while not self._stop.is_set() and not self._quota_reached():
            job = await self._acquire(stub)
            if job is None or not job.job_id:
                continue
            log.info("acquired job %s (%s)", job.job_id, job.WhichOneof("type"))
            self.current = JobRun(self, stub, job)
            try:
                await self.current.run()
            finally:
                self.current = None
            self.jobs_done += 1

    async def _acquire(self, stub: Any) -> pd.AcquiredJob | None:
        # Our side of the stream is an iterator we end ourselves, so nothing of
        # the call outlives it.
        outbox: asyncio.Queue[pd.CancelAcquire | None] = asyncio.Queue()

        async def requests() -> AsyncIterator[pd.CancelAcquire]:
            while (item := await outbox.get()) is not None:
                yield item

        call = stub.AcquireJobWithCancel(requests(), metadata=self.settings.metadata())
        read = asyncio.ensure_future(call.read())
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            await asyncio.wait({read, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if not read.done():
                # Shutting down: ask the server to give up; a job locked meanwhile still comes.
                outbox.put_nowait(pd.CancelAcquire())
            response = await read
        finally:
            outbox.put_nowait(None)
            stopping.cancel()
            if not read.done():
                read.cancel()
        return response if isinstance(response, pd.AcquiredJob) else None  # else EOF


class JobRun:
    """One acquired job: its provisioner run, logs, heartbeats, cancel and report."""

    def __init__(self, daemon: ProvisionerDaemon, stub: Any, job: pd.AcquiredJob) -> None:
        self.daemon = daemon
        self.settings = daemon.settings
        self.stub = stub
        self.job = job
        self.kind = job.WhichOneof("type") or ""
        self.stage = ""
        self.logs: list[pd.Log] = []
        self.queued = asyncio.Event()  # a log line is waiting
        self.full = asyncio.Event()  # a batch is full: send now
        self.lock = asyncio.Lock()  # one UpdateJob at a time keeps logs in order
        self.canceled = asyncio.Event()  # graceful: the provisioner should stop
        self.forced = asyncio.Event()  # the grace is over (or the job is gone)
        self.cancel_reason = "canceled"
        self.last_update = time.monotonic()

    # -- logs and updates --------------------------------------------------------

    def _log(self, source: pd.LogSource.ValueType, level: int, output: str) -> None:
        self.logs.append(
            pd.Log(
                source=source,
                level=level,  # type: ignore[arg-type]
                created_at=time.time_ns() // 1_000_000,
                stage=self.stage,
                output=output,
            )
        )
        (self.full if len(self.logs) >= self.settings.log_batch else self.queued).set()

    def provisioner_log(self, level: sdk.LogLevel.ValueType, output: str) -> None:
        self._log(pd.PROVISIONER, level, output)

    def daemon_log(self, output: str, level: int = sdk.INFO) -> None:
        self._log(pd.PROVISIONER_DAEMON, level, output)

    def begin(self, stage: str) -> None:
        self.stage = stage
        self.daemon_log("")  # marks where the stage starts

    async def update(self, **fields: Any) -> pd.UpdateJobResponse:
        """Send queued logs (and `fields`), retrying while the server is away."""
        async with self.lock:
            logs, self.logs = self.logs, []
            self.queued.clear()
            self.full.clear()
            request = pd.UpdateJobRequest(job_id=self.job.job_id, logs=logs, **fields)
            try:
                response: pd.UpdateJobResponse = await self._call(self.stub.UpdateJob, request)
            except BaseException:
                self.logs[:0] = logs  # keep them for the next try
                raise
            self.last_update = time.monotonic()
        if response.canceled:
            self.cancel("canceled")
        return response

    async def _updater(self) -> None:
        """Logs on the debounce, heartbeats when idle, until the job ends."""
        while True:
            idle = self.settings.heartbeat - (time.monotonic() - self.last_update)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(idle, 0)):
                    await self.queued.wait()
            if self.logs and not self.full.is_set():
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.settings.log_debounce):
                        await self.full.wait()
            try:
                await self.update()
            except JobGone:
                return
            except aio.AioRpcError as exc:
                log.warning("update of job %s failed: %s", self.job.job_id, exc.details())

    async def _call(self, method: Any, request: Any) -> Any:
        """One report, retried with backoff while the server is unreachable."""
        delay = 0.5
        while True:
            try:
                return await method(request, metadata=self.settings.metadata())
            except aio.AioRpcError as exc:
                details = exc.details() or exc.code().name
                # An answer about the job itself, not about this request's content.
                if exc.code() in GONE and details in JOB_GONE_MESSAGES:
                    self._gone(details)
                    raise JobGone(details) from None
                if exc.code() not in RETRYABLE:
                    raise
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.settings.backoff_max)

    def _gone(self, why: str) -> None:
        log.warning("job %s is no longer ours: %s", self.job.job_id, why)
        self.cancel_reason = why
        self.canceled.set()
        self.forced.set()

    def cancel(self, reason: str) -> None:
        """Cancel gracefully now, and for good after the grace period."""
        if self.canceled.is_set():
            return
        self.cancel_reason = reason
        self.canceled.set()
        self.daemon_log(f"{reason}: stopping the provisioner", sdk.WARN)
        asyncio.get_running_loop().call_later(self.settings.cancel_grace, self.forced.set)

    # -- running -----------------------------------------------------------------

    async def run(self) -> None:
        updater = asyncio.ensure_future(self._updater())
        directory = Path(tempfile.mkdtemp(prefix="job-", dir=self.settings.work_dir))
        try:
            try:
                report: pd.CompletedJob | pd.FailedJob = await self._execute(directory)
            except JobGone:
                return
            except Failed as exc:
                report = self._failure(exc.message, exc.state)
            except Exception as exc:
                log.exception("job %s failed in the daemon", self.job.job_id)
                report = self._failure(f"provisioner daemon error: {exc}", b"")
            self.begin(CLEANING_UP)
            shutil.rmtree(directory, ignore_errors=True)
            updater.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await updater
            with contextlib.suppress(JobGone):
                await self.update()  # every log line before the report
                if isinstance(report, pd.CompletedJob):
                    await self._call(self.stub.CompleteJob, report)
                else:
                    await self._call(self.stub.FailJob, report)
        finally:
            updater.cancel()
            shutil.rmtree(directory, ignore_errors=True)

    def _failure(self, message: str, state: bytes) -> pd.FailedJob:
        failed = pd.FailedJob(job_id=self.job.job_id, error=message)
        if self.kind == "workspace_build":
            failed.workspace_build.state = state
        elif self.kind == "template_import":
            failed.template_import.SetInParent()
        else:
            failed.template_dry_run.SetInParent()
        return failed

    async def _step(self, work: Awaitable[T]) -> T:
        """Run a provisioner call; a forced cancel stops it where it is."""
        task = asyncio.ensure_future(work)
        forced = asyncio.ensure_future(self.forced.wait())
        try:
            await asyncio.wait({task, forced}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forced.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
            raise Failed(f"{self.cancel_reason} (the provisioner was stopped)")
        return task.result()

    async def _execute(self, directory: Path) -> pd.CompletedJob:
        self.begin(SETTING_UP)
        provisioner = self.daemon.provisioners.get(self.job.provisioner)
        if provisioner is None:
            raise Failed(f"this daemon does not serve provisioner {self.job.provisioner!r}")
        try:
            skipped = archive.extract(self.job.template_source_archive, directory)
        except InvalidArgument as exc:
            raise Failed(exc.message) from None
        for name in skipped:
            self.daemon_log(f"skipped archive entry {name!r}: it leaves the template's root")
        state = self.job.workspace_build.state if self.kind == "workspace_build" else b""
        session = Session(directory, state, self.provisioner_log, self.canceled)
        if self.kind == "template_import":
            return await self._import(provisioner, session)
        if self.kind == "workspace_build":
            return await self._build(provisioner, session)
        if self.kind == "template_dry_run":
            return await self._dry_run(provisioner, session)
        raise Failed(f"unknown job type {self.kind!r}")

    def _check(self, error: str, state: bytes = b"") -> None:
        if self.canceled.is_set():
            raise Failed(error or self.cancel_reason, state)
        if error:
            raise Failed(error, state)

    async def _import(self, provisioner: Provisioner, session: Session) -> pd.CompletedJob:
        request = self.job.template_import
        self.begin(PARSING)
        parsed = await self._step(provisioner.parse(session))
        self._check(parsed.error)
        try:
            answer = await self.update(
                template_variables=parsed.template_variables,
                user_variable_values=request.user_variable_values,
                readme=parsed.readme,
            )
        except aio.AioRpcError as exc:
            raise Failed(exc.details() or exc.code().name) from None
        plans = []
        for stage, transition in ((DETECTING_START, sdk.START), (DETECTING_STOP, sdk.STOP)):
            self.begin(stage)
            metadata = sdk.Metadata()
            metadata.CopyFrom(request.metadata)
            metadata.workspace_transition = transition
            plan = await self._step(
                provisioner.plan(
                    session,
                    sdk.PlanRequest(metadata=metadata, variable_values=answer.variable_values),
                )
            )
            self._check(plan.error)
            plans.append(plan)
        start, stop = plans
        return pd.CompletedJob(
            job_id=self.job.job_id,
            template_import=pd.CompletedJob.TemplateImport(
                start_resources=start.resources,
                stop_resources=stop.resources,
                rich_parameters=start.parameters,
                external_auth_providers=start.external_auth_providers,
            ),
        )

    async def _build(self, provisioner: Provisioner, session: Session) -> pd.CompletedJob:
        build = self.job.workspace_build
        transition = build.metadata.workspace_transition
        self.begin(PLANNING)
        plan = await self._step(
            provisioner.plan(
                session,
                sdk.PlanRequest(
                    metadata=build.metadata,
                    rich_parameter_values=build.rich_parameter_values,
                    variable_values=build.variable_values,
                    external_auth_providers=build.external_auth_providers,
                ),
            )
        )
        self._check(plan.error, build.state)
        cost = sum(r.daily_cost for r in plan.resources)
        if transition in (sdk.START, sdk.STOP) and cost > 0:
            self.begin(COMMIT_QUOTA)
            quota = await self._call(
                self.stub.CommitQuota,
                pd.CommitQuotaRequest(job_id=self.job.job_id, daily_cost=cost),
            )
            if not quota.ok:
                raise Failed(
                    f"insufficient quota: this build costs {cost} a day, {quota.credits_consumed}"
                    f" of the owner's {quota.budget} are in use",
                    build.state,
                )
            budget = str(quota.budget) if quota.budget >= 0 else "unlimited"
            self.daemon_log(f"quota: {quota.credits_consumed} of {budget} in use")
        self.begin(APPLYING.get(transition, "Applying"))
        applied = await self._step(
            provisioner.apply(session, sdk.ApplyRequest(metadata=build.metadata))
        )
        # A failed apply keeps whatever state it left: the next build starts from it.
        self._check(applied.error, applied.state or build.state)
        return pd.CompletedJob(
            job_id=self.job.job_id,
            workspace_build=pd.CompletedJob.WorkspaceBuild(
                state=applied.state, resources=applied.resources
            ),
        )

    async def _dry_run(self, provisioner: Provisioner, session: Session) -> pd.CompletedJob:
        dry = self.job.template_dry_run
        self.begin(PLANNING)
        plan = await self._step(
            provisioner.plan(
                session,
                sdk.PlanRequest(
                    metadata=dry.metadata,
                    rich_parameter_values=dry.rich_parameter_values,
                    variable_values=dry.variable_values,
                ),
            )
        )
        self._check(plan.error)
        return pd.CompletedJob(
            job_id=self.job.job_id,
            template_dry_run=pd.CompletedJob.TemplateDryRun(resources=plan.resources),
        )


class Failed(Exception):
    def __init__(self, message: str, state: bytes = b"") -> None:
        super().__init__(message)
        self.message = message
        self.state = state
