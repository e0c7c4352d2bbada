"""Vagrant RPCs for runners: GetRunner, RunnerConfig, RunnerJobStream."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from waystation.auth.service import Authenticator, recheck
from waystation.core.wire import RESUME_EVENTS, RESUME_JOB
from waystation.engine.engine import JobEngine, OutputAppender
from waystation.engine.feed import CONFIG_TOPIC, job_topic, wait
from waystation.errors import FailedPrecondition
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.server.errors import rpc

# The Vagrant front end speaks the protocol's own state enum.
_FINAL = (vs.Job.ERROR, vs.Job.SUCCESS)

log = logging.getLogger(__name__)

Ctx = aio.ServicerContext[Any, Any]
Request = vs.RunnerJobStreamRequest
Response = vs.RunnerJobStreamResponse


class RunnerRPCs:
    engine: JobEngine
    auth: Authenticator
    auth_enabled: bool

    @rpc
    async def GetRunner(self, request: vs.GetRunnerRequest, context: Ctx) -> vs.Runner:
        if not request.runner_id:
            raise FailedPrecondition("runner_id is required")
        return await self.engine.store.runner_get(request.runner_id)

    @rpc
    async def RunnerConfig(
        self, requests: AsyncIterator[vs.RunnerConfigRequest], context: Ctx
    ) -> None:
        """Register the runner, send its config now and after every change."""
        first = await _first(requests)
        if first is None or first.WhichOneof("event") != "open":
            raise FailedPrecondition("first message must be an Open event")
        runner = first.open.runner
        await self.engine.runner_connected(runner)
        # The client sends nothing more; its stream ending means it left.
        gone = asyncio.ensure_future(_drain(requests))
        waiting: asyncio.Future[Any] | None = None
        try:
            with self.engine.feed.subscribe(CONFIG_TOPIC) as changed:
                while not gone.done() and not self.engine.draining:
                    changed.clear()
                    variables = await self.engine.store.runner_config(runner.id)
                    config = vs.RunnerConfig(config_vars=variables)
                    await context.write(vs.RunnerConfigResponse(config=config))
                    waiting = asyncio.ensure_future(changed.wait())
                    await asyncio.wait((gone, waiting), return_when=asyncio.FIRST_COMPLETED)
                    waiting.cancel()
        finally:
            for task in (gone, waiting):
                if task is not None:
                    task.cancel()
                    task.add_done_callback(_consume)
            self.engine.runner_disconnected(runner.id)

    @rpc
    async def RunnerJobStream(self, requests: AsyncIterator[Request], context: Ctx) -> None:
        """One job per stream, step by step:

        1. The runner sends Request{runner_id}; it must be a known runner.
        2. We wait until a job is assigned to it (WAITING) and send Assignment.
        3. The runner acks (RUNNING), or sends Error (a nack: the job is
           requeued at once); anything else is a nack and an error.
        4. While it runs: Terminal events are output, Heartbeat extends the
           deadline; we send Cancel when the job is cancelled (force: the job
           already ended, and we close the stream).
        5. Complete or Error ends the job, after its output is persisted.
        A stream that breaks before the ack requeues the job at once; after
        the ack the job is left to the heartbeat timeout, as upstream, unless
        the runner resumes it (our extension, `_resume`).
        """
        resuming = _metadata(context, RESUME_JOB)
        first = await _first(requests)
        if first is None or first.WhichOneof("event") != "request":
            raise FailedPrecondition("first message must be a Request event")
        if resuming is not None:
            await self._resume(resuming, first.request.runner_id, requests, context)
            return
        runner = await self.engine.store.runner_get(first.request.runner_id)
        runner_id = runner.id

        # Step 2. If the client leaves while we wait, the wait is cancelled.
        job = await self.engine.next_job(runner, recheck(self.auth, context, self.auth_enabled))
        try:
            await context.write(Response(assignment=Response.JobAssignment(job=job)))
            # Step 3.
            reply = await _first(requests)
        except BaseException:
            await asyncio.shield(self.engine.nack(job, runner_id))
            raise
        kind = reply.WhichOneof("event") if reply is not None else None
        if kind != "ack":
            await self.engine.nack(job, runner_id)
            if kind in (None, "error"):
                return
            raise FailedPrecondition(f"ack expected, got: {kind}")
        # Following the job from before the ack, the acked state is the watcher's
        # first look: no change between the two can go unseen.
        feed, topic = self.engine.feed, job_topic(job.id)
        with feed.subscribe(topic) as changed:
            before = feed.version(topic)
            acked = await self.engine.ack(job, runner_id)
            if feed.version(topic) == before + 1:
                changed.clear()  # that was the ack's own publish
            await self._follow(acked, runner_id, requests, context, changed)

    async def _resume(
        self, job_id: str, runner_id: str, requests: AsyncIterator[Request], context: Ctx
    ) -> None:
        """A runner that lost the server while running a job carries on with it:
        the job must be RUNNING and held by this runner (else FAILED_PRECONDITION
        and nothing changes; a refused resume never gets other work). We answer
        with its Assignment again (no second ack) and, in the response header,
        how many output events we hold; the runner re-sends from there and goes
        on as after an ack."""
        with self.engine.feed.subscribe(job_topic(job_id)) as changed:
            job = await self.engine.resume(job_id, runner_id)
            await self._follow(job, runner_id, requests, context, changed, resume=True)

    async def _follow(
        self,
        job: vs.Job,
        runner_id: str,
        requests: AsyncIterator[Request],
        context: Ctx,
        changed: asyncio.Event,
        *,
        resume: bool = False,
    ) -> None:
        """Steps 4 and 5, on an acked or a resumed stream. `job` is its state when
        `changed` was last cleared."""
        detached = asyncio.Event()

        def detach() -> None:  # a resumed stream of this job takes over
            detached.set()
            changed.set()

        async with self.engine.attached(job.id, detach) as took_over:
            if took_over and resume:  # the stream before us may have ended it: look again
                job = await self.engine.resume(job.id, runner_id)
            async with self.engine.output_writer(job.id, resume=resume) as output:
                if resume:
                    header = ((RESUME_EVENTS, str(output.events)),)
                    await context.send_initial_metadata(header)
                    await context.write(Response(assignment=Response.JobAssignment(job=job)))
                ending = asyncio.Event()  # set once the runner itself ends the job
                watcher = asyncio.ensure_future(
                    self._watch_cancel(job, changed, context, ending, detached)
                )
                try:
                    await self._run(job.id, runner_id, requests, output, watcher, ending)
                finally:
                    watcher.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await watcher

    async def _run(
        self,
        job_id: str,
        runner_id: str,
        requests: AsyncIterator[Request],
        output: OutputAppender,
        watcher: asyncio.Future[None],
        ending: asyncio.Event,
    ) -> None:
        reader = aiter(requests)
        while True:
            step: asyncio.Future[Any] = asyncio.ensure_future(anext(reader))
            step.add_done_callback(_consume)
            try:
                await asyncio.wait((step, watcher), return_when=asyncio.FIRST_COMPLETED)
            finally:
                forced = not step.done()
                if forced:  # force-cancelled (or we are): stop listening
                    step.cancel()
            if forced:
                return
            try:
                message = step.result()
            except StopAsyncIteration:
                await output.flush()
                return  # runner went away; the heartbeat timeout will end the job
            kind = message.WhichOneof("event")
            if kind == "terminal":
                output.append(message.terminal)
            elif kind == "heartbeat":
                await self.engine.heartbeat(job_id, runner_id)
            elif kind == "complete":
                ending.set()
                await output.flush()
                await self.engine.complete(job_id, runner_id, result=message.complete.result)
                return
            elif kind == "error":
                ending.set()
                await output.flush()
                await self.engine.complete(job_id, runner_id, error=message.error.error)
                return
            else:
                raise FailedPrecondition(f"unexpected event while running: {kind}")

    async def _watch_cancel(
        self,
        job: vs.Job,
        changed: asyncio.Event,
        context: Ctx,
        ending: asyncio.Event,
        detached: asyncio.Event,
    ) -> None:
        """Send Cancel when the job is cancelled; return once it was forced to end
        (or another stream took the job over). `job` is its state when `changed`
        (its feed) was last cleared."""
        signalled = False
        while not ending.is_set() and not detached.is_set():
            if job.state in _FINAL:  # forced: a second cancel, or the heartbeat timeout
                await context.write(Response(cancel=Response.JobCancel(force=True)))
                return
            if job.state == vs.Job.RUNNING and job.HasField("cancel_time") and not signalled:
                await context.write(Response(cancel=Response.JobCancel(force=False)))
                signalled = True
            await wait(changed, self.engine.timeouts.poll)
            changed.clear()
            job = await self.engine.get(job.id)


def _metadata(context: Ctx, key: str) -> str | None:
    for name, value in context.invocation_metadata() or ():
        if name == key:
            return str(value)
    return None


async def _first(requests: AsyncIterator[Any]) -> Any:
    try:
        return await anext(aiter(requests))
    except StopAsyncIteration:
        return None


async def _drain(requests: AsyncIterator[Any]) -> None:
    async for _ in requests:
        pass


def _consume(task: asyncio.Future[Any]) -> None:
    """Retrieve a background read's outcome so asyncio does not report it."""
    if not task.cancelled():
        task.exception()
