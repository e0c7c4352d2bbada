"""`waystation runner`: the agent that takes jobs from a server and runs them.

One RunnerConfig stream registers the runner and keeps its config variables
current; each of `concurrency` workers loops on RunnerJobStream: request,
receive an assignment, ack, run it while heartbeating and streaming output,
then report Complete or Error. When the server goes away, everything
reconnects with capped exponential backoff (starting over once connected).

A job in hand outlives the server: its command keeps running and its output
is kept, and its stream is resumed (waystation.core.wire) once the server is back;
the server says how many output events it holds, and the rest is re-sent. If
the server refuses the resume (the job ended meanwhile), the command stops.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import code_pb2
from grpc import aio

from waystation.client import Connection, reconnect_pause
from waystation.core.limits import MAX_MESSAGE_BYTES
from waystation.core.wire import RESUME_EVENTS, RESUME_JOB
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.runner.operations import JobFailed, Runtime, execute
from waystation.runner.plugins import Plugin, load_plugins
from waystation.runner.ui import BATCH_EVENTS, UI

log = logging.getLogger(__name__)

Request = vs.RunnerJobStreamRequest
Terminal = vs.GetJobStreamResponse.Terminal
EOF: Any = aio.EOF  # type: ignore[attr-defined]

FIRST_DELAY = 0.5  # seconds before the first reconnect of an outage
# The server refused the runner itself: retrying cannot help.
FATAL = (
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.UNAUTHENTICATED,
    grpc.StatusCode.PERMISSION_DENIED,
)
# A stream that failed with one of these may be resumed; any other answer to a
# resume is a refusal.
TRANSIENT = (
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.INTERNAL,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
    grpc.StatusCode.ABORTED,
)
# A channel kept open across an outage (the one a job's plugins call the server
# on) tries to reconnect at least this often, not grpc's default of 2 minutes.
CHANNEL_OPTIONS = (("grpc.max_reconnect_backoff_ms", 2000),)
# Re-sent output goes in messages of at most this many events and about this size.
RESEND_BYTES = MAX_MESSAGE_BYTES // 4


@dataclass
class AgentSettings:
    address: str
    runner_id: str
    data_dir: Path
    by_id_only: bool = False
    concurrency: int = 1
    heartbeat: float = 15.0  # seconds between heartbeats while a job runs
    max_jobs: int | None = None  # stop after this many jobs (tests, burst mode)
    backoff_max: float = 30.0
    token: str = ""  # a login token (`waystation token login`)
    tls: bool = False
    tls_ca: str = ""
    tls_skip_verify: bool = False

    def connection(self) -> Connection:
        return Connection(self.address, self.token, self.tls, self.tls_ca, self.tls_skip_verify)

    def channel(self) -> aio.Channel:
        """Bidirectional calls on it take `metadata()` (see Connection.aio_channel)."""
        return self.connection().aio_channel(CHANNEL_OPTIONS, intercept_bidi=False)

    def metadata(self, *extra: tuple[str, str]) -> tuple[tuple[str, str], ...]:
        return (*self.connection().metadata(), *extra)


@dataclass
class Agent:
    settings: AgentSettings
    plugins: list[Plugin] = field(default_factory=load_plugins)
    env: dict[str, str] = field(default_factory=dict)
    jobs_done: int = 0
    registered: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _waiting: set[asyncio.Future[Any]] = field(default_factory=set)
    # Jobs in hand run as tasks of their own: a session that ends (the server
    # went away) does not end them. Each holds one of `concurrency` slots.
    _runs: dict[asyncio.Future[None], JobRun] = field(default_factory=dict)
    _slots: asyncio.Semaphore = field(init=False)
    _handed_slot: set[asyncio.Task[Any]] = field(default_factory=set)
    _channel: aio.Channel | None = None  # the current session's
    _retired: set[aio.Channel] = field(default_factory=set)  # closed when their jobs end
    _closing: set[asyncio.Future[None]] = field(default_factory=set)

    def __post_init__(self) -> None:
        self._slots = asyncio.Semaphore(self.settings.concurrency)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Serve until stopped (or until max_jobs), reconnecting as needed; then
        wait for the jobs in hand. The server refusing the runner (a bad token)
        raises its AioRpcError."""
        delay = FIRST_DELAY
        finished = False
        try:
            while not self._stop.is_set() and not self._quota_reached():
                channel = self._channel = self.settings.channel()
                try:
                    await self._session(vs_grpc.VagrantStub(channel))
                    delay = FIRST_DELAY
                except aio.AioRpcError as exc:
                    if exc.code() in FATAL:
                        raise
                    if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                        log.error(
                            "server refused the runner: %s: %s", exc.code().name, exc.details()
                        )
                    if self.registered.is_set():
                        delay = FIRST_DELAY  # it was up: a new outage starts the backoff over
                    self.registered.clear()
                    delay = await reconnect_pause(
                        exc.code().name, delay, self._stop, self.settings.backoff_max
                    )
                finally:
                    self._retire(channel)
            finished = True
        finally:
            runs = list(self._runs)
            if not finished:
                for task in runs:
                    task.cancel()
            await asyncio.gather(*runs, return_exceptions=True)
            for channel in list(self._retired):
                self._close_later(channel)
            await asyncio.gather(*self._closing, return_exceptions=True)

    def _quota_reached(self) -> bool:
        return self.settings.max_jobs is not None and self.jobs_done >= self.settings.max_jobs

    def _release_idle(self) -> None:
        """Workers waiting for an assignment give up (a job just assigned is nacked)."""
        for read in list(self._waiting):
            read.cancel()

    async def _session(self, stub: vs_grpc.VagrantAsyncStub) -> None:
        config = asyncio.ensure_future(self._config_stream(stub))
        registered = asyncio.ensure_future(self.registered.wait())
        await asyncio.wait({config, registered}, return_when=asyncio.FIRST_COMPLETED)
        if not registered.done():
            registered.cancel()
            await config  # the stream failed before registering: raise why
            return
        workers = [
            asyncio.ensure_future(self._worker(stub)) for _ in range(self.settings.concurrency)
        ]
        stopping = asyncio.ensure_future(self._stop.wait())
        try:
            done, _ = await asyncio.wait(
                {config, stopping, *workers}, return_when=asyncio.FIRST_COMPLETED
            )
            if config in done:
                config.result()  # raises if the server broke the stream
                return  # the server ended it: reconnect
            if stopping in done:
                self._release_idle()  # running jobs finish; no new ones start
            await asyncio.gather(*workers)
        finally:
            for task in (config, stopping, *workers):
                task.cancel()
            await asyncio.gather(config, stopping, *workers, return_exceptions=True)

    async def _config_stream(self, stub: vs_grpc.VagrantAsyncStub) -> None:
        runner = vs.Runner(id=self.settings.runner_id, by_id_only=self.settings.by_id_only)
        # Written to, never half-closed: we are here while it is open.
        call: Any = stub.RunnerConfig(metadata=self.settings.metadata())  # type: ignore[call-arg]
        try:
            await _first_write(
                call, vs.RunnerConfigRequest(open=vs.RunnerConfigRequest.Open(runner=runner))
            )
            while (response := await call.read()) is not EOF:
                self.env = {v.name: v.value for v in response.config.config_vars}
                log.info("config: %d variables", len(self.env))
                self.registered.set()
        finally:
            call.cancel()

    async def _worker(self, stub: vs_grpc.VagrantAsyncStub) -> None:
        me = asyncio.current_task()
        assert me is not None
        while not self._stop.is_set() and not self._quota_reached():
            await self._slots.acquire()  # a job of a past session may still hold one
            try:
                await self._one_job(stub)
            finally:
                if me in self._handed_slot:  # a job run holds it now, and releases it
                    self._handed_slot.discard(me)
                else:
                    self._slots.release()

    async def _one_job(self, stub: vs_grpc.VagrantAsyncStub) -> None:
        # Written to below.
        call: Any = stub.RunnerJobStream(metadata=self.settings.metadata())  # type: ignore[call-arg]
        await _first_write(
            call, Request(request=Request.Request(runner_id=self.settings.runner_id))
        )
        read = asyncio.ensure_future(call.read())
        self._waiting.add(read)
        if self._stop.is_set() or self._quota_reached():
            read.cancel()  # stopped while this request went out: _release_idle missed it
        try:
            response = await read
        except asyncio.CancelledError:
            call.cancel()  # the server requeues anything it had just assigned
            return
        finally:
            self._waiting.discard(read)
        if response is EOF:
            return
        if self._stop.is_set() or self._quota_reached():
            call.cancel()  # assigned as we stopped: not acked, so the server requeues it
            return
        job: vs.Job = response.assignment.job
        self.jobs_done += 1  # counted before the ack's await: workers woken together see it
        if self._quota_reached():
            self._release_idle()
        try:
            await call.write(Request(ack=Request.Ack()))
        except (aio.AioRpcError, asyncio.InvalidStateError):
            # Not acked, so the server requeues it (at once, or at the ack timeout).
            log.warning("job %s: lost the server before the ack", job.id)
            self.jobs_done -= 1
            return
        log.info("job %s: %s", job.id, _describe(job))
        await self._start(JobRun(self, call, stub, job, self._channel))

    async def _start(self, job_run: JobRun) -> None:
        """Run the job as a task of its own, holding this worker's slot; wait for it
        (a worker cancelled meanwhile leaves it running)."""
        task = asyncio.ensure_future(job_run.run())
        self._runs[task] = job_run
        me = asyncio.current_task()
        if me is not None:
            self._handed_slot.add(me)
        task.add_done_callback(self._run_done)
        await asyncio.shield(task)

    def _run_done(self, task: asyncio.Future[None]) -> None:
        job_run = self._runs.pop(task)
        self._slots.release()
        if not task.cancelled() and task.exception() is not None:
            log.error("job %s: runner error", job_run.job.id, exc_info=task.exception())
        channel = job_run.channel
        if channel in self._retired and not self._in_use(channel):
            self._retired.discard(channel)
            self._close_later(channel)

    def _in_use(self, channel: aio.Channel | None) -> bool:
        return any(r.channel is channel for r in self._runs.values())

    def _retire(self, channel: aio.Channel) -> None:
        """A session ended: close its channel, once no job that came on it runs
        (it may finish on a server that is draining; plugins call on it)."""
        if self._in_use(channel):
            self._retired.add(channel)
        else:
            self._close_later(channel)

    def _close_later(self, channel: aio.Channel) -> None:
        closing = asyncio.ensure_future(channel.close(None))
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)


class _Refused(Exception):
    """The server will not take the job back."""


@dataclass(eq=False)
class _Link:
    """One stream carrying the job: the first, or a resumed one."""

    call: Any
    channel: aio.Channel | None  # a resume's own, closed with the link
    lost: asyncio.Event = field(default_factory=asyncio.Event)
    tasks: list[asyncio.Future[None]] = field(default_factory=list)  # listener, heartbeat


@dataclass
class JobRun:
    """One assigned, acked job: run it, heartbeat, relay cancels, report; resume
    its stream when the server goes away."""

    agent: Agent
    call: Any
    stub: vs_grpc.VagrantAsyncStub
    job: vs.Job
    channel: aio.Channel | None = None  # the session's, which it came on
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    # The job's output events from `held` on, kept until it ends: which of them
    # the server persisted is known only when a resume says so (then `held`).
    events: list[Terminal.Event] = field(default_factory=list)
    held: int = 0
    written: int = 0  # events (from the job's first) written to the current stream
    _lock: asyncio.Lock = field(default_factory=asyncio.Lock)  # one write at a time
    _link: _Link = field(init=False)
    _linked: asyncio.Event = field(default_factory=asyncio.Event)  # _link is live
    _reporting: bool = False  # the outcome is out: the stream's end is expected
    _outcome_sent: bool = False  # on some stream (the server may have it)
    _over: str = ""  # why nothing more is to be sent (forced, refused)

    async def run(self) -> None:
        ui = UI(self._send)
        runtime = Runtime(
            self.agent.plugins, self.agent.settings.data_dir, dict(self.agent.env), self.stub
        )
        work = asyncio.ensure_future(execute(self.job, ui, runtime, self.cancelled))
        self._attach(_Link(self.call, None), work)
        keeper = asyncio.ensure_future(self._keep_linked(work))
        try:
            try:
                result = await work
                outcome = Request(complete=Request.Complete(result=result))
                log.info("job %s: done", self.job.id)
            except asyncio.CancelledError:
                if not work.cancelled():
                    raise  # the agent itself is being cancelled
                log.warning("job %s: stopped (%s)", self.job.id, self._over or "cancelled")
                return  # the server already ended the job
            except JobFailed as exc:
                outcome = Request(error=Request.Error(error=exc.status))
                log.info("job %s: failed: %s", self.job.id, exc.status.message)
            except Exception as exc:
                log.exception("job %s: crashed", self.job.id)
                failure = JobFailed(code_pb2.INTERNAL, f"runner error: {exc}")
                outcome = Request(error=Request.Error(error=failure.status))
            await ui.flush()
            await self._report(outcome, keeper)
        finally:
            work.cancel()
            keeper.cancel()
            await asyncio.gather(work, keeper, return_exceptions=True)
            await self._drop(self._link)

    # -- the stream ----------------------------------------------------------

    def _attach(self, link: _Link, work: asyncio.Future[Any]) -> None:
        self._link = link
        link.tasks = [
            asyncio.ensure_future(self._listen(link, work)),
            asyncio.ensure_future(self._heartbeat(link)),
        ]
        self._linked.set()

    async def _drop(self, link: _Link) -> None:
        link.lost.set()
        for task in link.tasks:
            task.cancel()
        link.call.cancel()
        await asyncio.gather(*link.tasks, return_exceptions=True)
        if link.channel is not None:
            await link.channel.close(None)

    def _lose(self, link: _Link) -> None:
        if link is self._link:
            self._linked.clear()
        link.lost.set()

    async def _write(self, link: _Link, request: Request) -> bool:
        """Write on the link; False (and the link is lost) if it broke."""
        if link.lost.is_set():
            return False
        try:
            await link.call.write(request)
            return True
        except (aio.AioRpcError, asyncio.InvalidStateError) as exc:
            log.debug("job %s: stream broke: %s", self.job.id, exc)
        except asyncio.CancelledError:
            if _cancelling():
                raise
            # Not us: grpc cancelled the call under us.
        self._lose(link)
        return False

    async def _send(self, terminal: Terminal) -> None:
        """The UI's batches: kept, and written now if the stream is up."""
        self.events.extend(terminal.events)
        async with self._lock:
            await self._write_pending(self._link)

    async def _write_pending(self, link: _Link) -> bool:
        """Every event not yet written on the link (call with the lock held)."""
        while self.written < self.held + len(self.events):
            chunk = _chunk(self.events, self.written - self.held)
            if not await self._write(link, Request(terminal=Terminal(events=chunk))):
                return False
            self.written += len(chunk)
        return True

    async def _heartbeat(self, link: _Link) -> None:
        while not link.lost.is_set():
            await asyncio.sleep(self.agent.settings.heartbeat)
            async with self._lock:
                await self._write(link, Request(heartbeat=Request.Heartbeat()))

    async def _listen(self, link: _Link, work: asyncio.Future[Any]) -> None:
        """The link's only reader (cancelling a read would cancel the whole RPC):
        relays the server's Cancel (graceful sets the flag, force stops the work);
        the stream's end, unless expected, means it was lost."""
        try:
            while (response := await link.call.read()) is not EOF:
                if response.WhichOneof("event") != "cancel":
                    continue
                if response.cancel.force:
                    self._over = "force-cancelled"
                    work.cancel()
                    continue
                log.info("job %s: cancel requested", self.job.id)
                self.cancelled.set()
        except (aio.AioRpcError, asyncio.InvalidStateError) as exc:
            log.debug("job %s: stream ended: %s", self.job.id, exc)
        except asyncio.CancelledError:
            if _cancelling():
                raise
        if not self._reporting and not self._over:
            self._lose(link)

    # -- resuming ------------------------------------------------------------

    async def _keep_linked(self, work: asyncio.Future[Any]) -> None:
        """Whenever the stream is lost, resume it (with backoff, starting over
        after each success); a refusal stops the work."""
        settings = self.agent.settings
        never = asyncio.Event()  # a job in hand is resumed however long it takes
        while True:
            await self._link.lost.wait()
            if self._over:
                return
            await self._drop(self._link)
            delay = FIRST_DELAY
            while True:
                delay = await reconnect_pause(
                    f"job {self.job.id}", delay, never, settings.backoff_max
                )
                try:
                    await self._resume(work)
                    break
                except aio.AioRpcError as exc:
                    if exc.code() in TRANSIENT:
                        continue
                    refusal = f"{exc.code().name}: {exc.details()}"
                except _Refused as exc:
                    refusal = str(exc)
                if self._outcome_sent:  # most likely it had the outcome: the job ended
                    log.info("job %s: ended on the server (%s)", self.job.id, refusal)
                else:
                    log.error("job %s: the server will not resume it (%s)", self.job.id, refusal)
                self._over = "the server refused to resume it"
                work.cancel()
                return
            log.info("job %s: resumed", self.job.id)

    async def _resume(self, work: asyncio.Future[Any]) -> None:
        channel = self.agent.settings.channel()
        call: Any = vs_grpc.VagrantStub(channel).RunnerJobStream(  # type: ignore[call-arg]
            metadata=self.agent.settings.metadata((RESUME_JOB, self.job.id))
        )
        try:
            runner_id = self.agent.settings.runner_id
            await _first_write(call, Request(request=Request.Request(runner_id=runner_id)))
            response = await call.read()
            if response is EOF:
                raise _Refused("the stream ended without an answer")
            held = dict(await call.initial_metadata()).get(RESUME_EVENTS)
            if response.WhichOneof("event") != "assignment" or held is None:
                # A server without resume handed out work: not acked, it goes back.
                raise _Refused("the server does not resume jobs")
            count = int(held)
            answered = response.assignment.job.id
            if answered != self.job.id or not self.held <= count <= self.held + len(self.events):
                raise _Refused(f"the server answered with job {answered}, {count} events")
            link = _Link(call, channel)
            async with self._lock:  # the UI's sends wait: the re-sent output goes first
                # What the server holds is never needed again.
                del self.events[: count - self.held]
                self.held = self.written = count
                self._attach(link, work)
                await self._write_pending(link)
        except BaseException:
            call.cancel()
            await channel.close(None)
            raise

    # -- the end -------------------------------------------------------------

    async def _report(self, outcome: Request, keeper: asyncio.Future[None]) -> None:
        """Send the outcome once the stream is up, after all output; again on a
        resumed stream if the server went away before it said it had it."""
        while True:
            link = await self._live_link(keeper)
            if link is None:
                return  # refused: the job ended meanwhile
            async with self._lock:
                for task in link.tasks[1:]:  # no heartbeat after the outcome
                    task.cancel()
                self._reporting = await self._write_pending(link) and await self._write(
                    link, outcome
                )
                self._outcome_sent |= self._reporting
            if self._reporting:
                try:
                    await link.call.done_writing()
                    code = await link.call.code()
                except (aio.AioRpcError, asyncio.InvalidStateError):
                    code = grpc.StatusCode.UNAVAILABLE
                if code not in TRANSIENT:
                    if code != grpc.StatusCode.OK:
                        details = await link.call.details()
                        log.warning(
                            "job %s: the server refused its result: %s", self.job.id, details
                        )
                    return
                self._reporting = False
            self._lose(link)

    async def _live_link(self, keeper: asyncio.Future[None]) -> _Link | None:
        while not self._linked.is_set():
            if keeper.done():
                return None
            linked: asyncio.Future[Any] = asyncio.ensure_future(self._linked.wait())
            await asyncio.wait({linked, keeper}, return_when=asyncio.FIRST_COMPLETED)
            linked.cancel()
        return self._link


async def _first_write(call: Any, request: Any) -> None:
    """A stream's first message; if the call already failed (the server is not
    there), its AioRpcError rather than InvalidStateError."""
    try:
        await call.write(request)
    except asyncio.InvalidStateError:
        await call.read()  # raises why it ended
        raise


def _chunk(events: list[Terminal.Event], start: int) -> list[Terminal.Event]:
    """Events from `start` for one message: the UI's batch size, and not too big."""
    chunk: list[Terminal.Event] = []
    size = 0
    for event in events[start : start + BATCH_EVENTS]:
        size += event.ByteSize()
        if chunk and size > RESEND_BYTES:
            break
        chunk.append(event)
    return chunk


def _cancelling() -> bool:
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _describe(job: vs.Job) -> str:
    operation = job.WhichOneof("operation") or "?"
    if operation == "command":
        return f"command {job.command.command} {' '.join(job.command.cli_args.args)}".strip()
    return operation
