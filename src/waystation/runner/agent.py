"""`waystation runner`: the agent that takes jobs from a server and runs them.

One RunnerConfig stream registers the runner and keeps its config variables
current; each of `concurrency` workers loops on RunnerJobStream: request,
receive an assignment, ack, run it while heartbeating and streaming output,
then report Complete or Error. When the server goes away, everything
reconnects with capped exponential backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from google.rpc import code_pb2
from grpc import aio

from waystation.client import Connection, reconnect_pause
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.runner.operations import JobFailed, Runtime, execute
from waystation.runner.plugins import Plugin, load_plugins
from waystation.runner.ui import UI

log = logging.getLogger(__name__)

Request = vs.RunnerJobStreamRequest


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


@dataclass
class Agent:
    settings: AgentSettings
    plugins: list[Plugin] = field(default_factory=load_plugins)
    env: dict[str, str] = field(default_factory=dict)
    jobs_done: int = 0
    registered: asyncio.Event = field(default_factory=asyncio.Event)
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _waiting: set[asyncio.Future[Any]] = field(default_factory=set)

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Serve until stopped (or until max_jobs), reconnecting as needed."""
        delay = 0.5
        while not self._stop.is_set() and not self._quota_reached():
            try:
                async with self.settings.connection().aio_channel() as channel:
                    await self._session(vs_grpc.VagrantStub(channel))
                    delay = 0.5
            except aio.AioRpcError as exc:
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
                    log.error("server refused the runner: %s: %s", exc.code().name, exc.details())
                    if exc.code() in (
                        grpc.StatusCode.NOT_FOUND,
                        grpc.StatusCode.INVALID_ARGUMENT,
                        grpc.StatusCode.UNAUTHENTICATED,
                        grpc.StatusCode.PERMISSION_DENIED,
                    ):
                        raise
                self.registered.clear()
                delay = await reconnect_pause(
                    exc.code().name, delay, self._stop, self.settings.backoff_max
                )

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

        async def requests() -> AsyncIterator[vs.RunnerConfigRequest]:
            yield vs.RunnerConfigRequest(open=vs.RunnerConfigRequest.Open(runner=runner))
            await asyncio.Event().wait()  # keep the stream open: we are here while it is

        async for response in stub.RunnerConfig(requests()):
            self.env = {v.name: v.value for v in response.config.config_vars}
            log.info("config: %d variables", len(self.env))
            self.registered.set()

    async def _worker(self, stub: vs_grpc.VagrantAsyncStub) -> None:
        while not self._stop.is_set() and not self._quota_reached():
            await self._one_job(stub)

    async def _one_job(self, stub: vs_grpc.VagrantAsyncStub) -> None:
        call: Any = stub.RunnerJobStream()  # type: ignore[call-arg]  # written to below
        await call.write(Request(request=Request.Request(runner_id=self.settings.runner_id)))
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
        if response is aio.EOF:  # type: ignore[attr-defined]
            return
        if self._stop.is_set() or self._quota_reached():
            call.cancel()  # assigned as we stopped: not acked, so the server requeues it
            return
        job: vs.Job = response.assignment.job
        self.jobs_done += 1  # counted before the ack's await: workers woken together see it
        if self._quota_reached():
            self._release_idle()
        await call.write(Request(ack=Request.Ack()))
        log.info("job %s: %s", job.id, _describe(job))
        await JobRun(self, call, stub, job).run()


@dataclass
class JobRun:
    """One assigned, acked job: run it, heartbeat, relay cancels, report."""

    agent: Agent
    call: Any
    stub: vs_grpc.VagrantAsyncStub
    job: vs.Job
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        lock = asyncio.Lock()  # one write at a time on the stream

        async def send(terminal: vs.GetJobStreamResponse.Terminal) -> None:
            async with lock:
                await self.call.write(Request(terminal=terminal))

        ui = UI(send)
        runtime = Runtime(
            self.agent.plugins, self.agent.settings.data_dir, dict(self.agent.env), self.stub
        )
        work = asyncio.ensure_future(execute(self.job, ui, runtime, self.cancelled))
        heartbeat = asyncio.ensure_future(self._heartbeat(lock))
        # The only reader of the stream: cancelling a read would cancel the whole RPC.
        listener = asyncio.ensure_future(self._listen(work))
        try:
            result = await work
            outcome = Request(complete=Request.Complete(result=result))
            log.info("job %s: done", self.job.id)
        except asyncio.CancelledError:
            if not work.cancelled():
                raise  # the agent itself is being cancelled
            log.warning("job %s: force-cancelled", self.job.id)
            return  # the server already ended the job and closes the stream
        except JobFailed as exc:
            outcome = Request(error=Request.Error(error=exc.status))
            log.info("job %s: failed: %s", self.job.id, exc.status.message)
        except Exception as exc:
            log.exception("job %s: crashed", self.job.id)
            failure = JobFailed(code_pb2.INTERNAL, f"runner error: {exc}")
            outcome = Request(error=Request.Error(error=failure.status))
        finally:
            # Under the lock: cancelling a write in progress would cancel the whole RPC.
            async with lock:
                heartbeat.cancel()
        await ui.flush()
        async with lock:
            with contextlib.suppress(aio.AioRpcError, asyncio.InvalidStateError):
                await self.call.write(outcome)
                await self.call.done_writing()
        with contextlib.suppress(aio.AioRpcError, TimeoutError):
            async with asyncio.timeout(60):
                await listener  # ends when the server closes the stream

    async def _heartbeat(self, lock: asyncio.Lock) -> None:
        while True:
            await asyncio.sleep(self.agent.settings.heartbeat)
            async with lock:
                await self.call.write(Request(heartbeat=Request.Heartbeat()))

    async def _listen(self, work: asyncio.Future[Any]) -> None:
        """Relay the server's Cancel: graceful sets the flag, force stops the work."""
        while True:
            response = await self.call.read()
            if response is aio.EOF:  # type: ignore[attr-defined]
                return
            if response.WhichOneof("event") == "cancel":
                if response.cancel.force:
                    work.cancel()
                    continue
                log.info("job %s: cancel requested", self.job.id)
                self.cancelled.set()


def _describe(job: vs.Job) -> str:
    operation = job.WhichOneof("operation") or "?"
    if operation == "command":
        return f"command {job.command.command} {' '.join(job.command.cli_args.args)}".strip()
    return operation
