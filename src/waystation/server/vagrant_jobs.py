"""Vagrant RPCs for jobs: queue, validate, get, list, cancel, prune, watch, logs."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from google.protobuf.empty_pb2 import Empty
from google.rpc import code_pb2, status_pb2
from grpc import aio

from waystation.engine.engine import JobEngine
from waystation.engine.feed import OUTPUT_TOPIC, job_topic, output_topic, wait
from waystation.engine.validation import check_new_job, parse_expiry
from waystation.errors import FailedPrecondition, WaystationError
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.server import logstream
from waystation.server.errors import rpc, stream_rpc
from waystation.server.principal import current_actor

# The Vagrant front end speaks the protocol's own state enum.
_FINAL = (vs.Job.ERROR, vs.Job.SUCCESS)
_HELD = (vs.Job.WAITING, vs.Job.RUNNING)

Ctx = aio.ServicerContext[Any, Any]
StreamResponse = vs.GetJobStreamResponse


class JobRPCs:
    engine: JobEngine

    @rpc
    async def QueueJob(self, request: vs.QueueJobRequest, context: Ctx) -> vs.QueueJobResponse:
        if not request.HasField("job"):
            raise FailedPrecondition("job is required")
        check_new_job(request.job)
        expiry = parse_expiry(request.expires_in)
        seconds = expiry.total_seconds() if expiry is not None else None
        return vs.QueueJobResponse(job_id=await self.engine.queue(request.job, seconds))

    @rpc
    async def ValidateJob(
        self, request: vs.ValidateJobRequest, context: Ctx
    ) -> vs.ValidateJobResponse:
        if not request.HasField("job"):
            raise FailedPrecondition("job is required")
        try:
            check_new_job(request.job)
        except WaystationError as exc:
            error = status_pb2.Status(code=code_pb2.FAILED_PRECONDITION, message=exc.message)
            return vs.ValidateJobResponse(valid=False, validation_error=error)
        assignable = not request.disable_assign and await self.engine.assignable(request.job)
        return vs.ValidateJobResponse(valid=True, assignable=assignable)

    @rpc
    async def GetJob(self, request: vs.GetJobRequest, context: Ctx) -> vs.Job:
        if not request.job_id:
            raise FailedPrecondition("job_id is required")
        return await self.engine.get(request.job_id)

    @rpc
    async def _ListJobs(self, request: vs.ListJobsRequest, context: Ctx) -> vs.ListJobsResponse:
        return vs.ListJobsResponse(jobs=await self.engine.list())

    @rpc
    async def CancelJob(self, request: vs.CancelJobRequest, context: Ctx) -> Empty:
        if not request.job_id:
            raise FailedPrecondition("job_id is required")
        await self.engine.cancel(request.job_id, actor=current_actor(context))
        return Empty()

    @rpc
    async def PruneOldJobs(self, request: Empty, context: Ctx) -> Empty:
        await self.engine.prune(self.engine.timeouts.prune_rpc_keep, current_actor(context))
        return Empty()

    @stream_rpc
    async def GetJobStream(
        self, request: vs.GetJobStreamRequest, context: Ctx
    ) -> AsyncIterator[StreamResponse | bytes]:
        """Open; State on every change; output (buffered, then live); Complete last."""
        if not request.job_id:
            raise FailedPrecondition("job_id is required")
        job_id = request.job_id
        joined = time.monotonic()  # output that reached us before this is backlog
        job = await self.engine.get(job_id)  # NOT_FOUND before any message
        yield StreamResponse(open=StreamResponse.Open())
        feed = self.engine.feed
        poll = self.engine.timeouts.poll
        with feed.subscribe(job_topic(job_id), output_topic(job_id)) as wake:
            async with self.engine.output(job_id) as output:
                previous, canceling = vs.Job.UNKNOWN, False
                seen_version, sent = -1, 0
                looked_elsewhere = False
                while True:
                    wake.clear()
                    version = feed.version(job_topic(job_id))
                    if version != seen_version or looked_elsewhere:
                        seen_version = version
                        job = await self.engine.get(job_id)
                    now_canceling = job.HasField("cancel_time")
                    missed = _missed_canceling(job, previous, canceling)
                    if missed is not None:
                        yield missed
                        canceling = True
                    if job.state != previous or now_canceling != canceling:
                        yield StreamResponse(
                            state=StreamResponse.State(
                                previous=previous,
                                current=job.state,
                                job=job,
                                canceling=now_canceling,
                            )
                        )
                        previous, canceling = job.state, now_canceling
                    final = job.state in _FINAL
                    if final or looked_elsewhere:
                        await output.refresh(self.engine.store)  # rows another server wrote
                    # Batches may arrive while we yield: count each one sent.
                    while sent < output.next_seq:
                        # Encoded once for every watcher (see server.app.AllowEncoded).
                        live_from = output.live_from(joined)
                        buffered = sent < live_from
                        until = live_from if buffered else output.next_seq
                        encoded, sent = output.terminal_response(sent, buffered, until)
                        yield encoded
                    if final:
                        # Set only what the job has: clients read a present error as failure.
                        complete = StreamResponse.Complete()
                        if job.HasField("error"):
                            complete.error.CopyFrom(job.error)
                        if job.HasField("result"):
                            complete.result.CopyFrom(job.result)
                        yield StreamResponse(complete=complete)
                        return
                    looked_elsewhere = not await wait(wake, poll)

    @stream_rpc
    async def GetLogStream(
        self, request: vs.GetLogStreamRequest, context: Ctx
    ) -> AsyncIterator[vs.LogBatch]:
        """The last `limit_backlog` lines of a scope's jobs, then new lines live."""
        kind = request.WhichOneof("scope")
        if kind is None:
            raise FailedPrecondition("log stream scope (basis, project or target) is required")
        limit = {0: 50}.get(request.limit_backlog, request.limit_backlog)
        ref = getattr(request, kind)
        follower = logstream.ScopeLog(self.engine.store, kind, ref)
        with self.engine.feed.subscribe(OUTPUT_TOPIC) as wake:
            backlog = await follower.backlog(None if limit < 0 else limit)
            for batch in backlog:
                yield batch
            while True:
                wake.clear()
                await wait(wake, self.engine.timeouts.poll)
                for batch in await follower.new_lines():
                    yield batch


def _missed_canceling(job: vs.Job, previous: Any, canceling: bool) -> StreamResponse | None:
    """The canceling state of a job that was cancelled while held and ended before
    this watcher looked again (two commits between two reads): clients show
    "canceling", so it is reported as it was, from the job's own timestamps."""
    if canceling or previous not in _HELD or job.state not in _FINAL:
        return None
    if not job.HasField("cancel_time") or (
        job.cancel_time.ToMicroseconds() >= job.complete_time.ToMicroseconds()
    ):
        return None  # never held while canceling (or forced at once)
    was = vs.Job()
    was.CopyFrom(job)
    was.state = previous
    for done in ("complete_time", "error", "result"):
        was.ClearField(done)
    return StreamResponse(
        state=StreamResponse.State(previous=previous, current=previous, job=was, canceling=True)
    )
