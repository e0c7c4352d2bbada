"""Provisioner jobs end to end: template imports through the ProvisionerDaemon RPCs.

The jobs are queued first (PushTemplate, one small echo archive each); then
1 or 10 daemons, in processes of their own, each loop AcquireJobWithCancel ->
UpdateJob (20 log lines) -> CompleteJob, as a real daemon's RPCs for an
import do. Measured: jobs/s from the moment every daemon process is up to
the last completion.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from grpc import aio

from bench import cpu
from bench.common import CTX, Options, Results, run_async_in_process, waystation_server
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.provisionerd.proto import provisionerd_pb2_grpc as pd_grpc
from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.protocol.waystation.v1 import provisioning_pb2_grpc as pv_grpc
from waystation.testing import daemon_metadata, echo_template, push_request

DAEMON_PROCESSES = 2
LOG_LINES = [
    pd.Log(
        source=pd.PROVISIONER, level=sdk.INFO, stage="Planning infrastructure", output=f"line {i}"
    )
    for i in range(20)
]


async def queue_imports(address: str, count: int, inflight: int) -> None:
    archive = echo_template()
    async with aio.insecure_channel(address) as channel:
        stub = pv_grpc.ProvisioningStub(channel)
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < count:
                next_index += 1
                await stub.PushTemplate(push_request(name=f"t{next_index % 50}", archive=archive))

        await asyncio.gather(*(worker() for _ in range(inflight)))


async def daemon_loop(stub: Any, daemon_id: str, done: Any, stop: Any) -> None:
    md = daemon_metadata(daemon_id)
    while not stop.is_set():
        done_reading = asyncio.Event()

        call = stub.AcquireJobWithCancel(_until(done_reading), metadata=md)
        job = await call.read()
        done_reading.set()
        if not isinstance(job, pd.AcquiredJob) or not job.job_id:
            continue
        await stub.UpdateJob(pd.UpdateJobRequest(job_id=job.job_id, logs=LOG_LINES), metadata=md)
        completed = pd.CompletedJob(
            job_id=job.job_id, template_import=pd.CompletedJob.TemplateImport()
        )
        await stub.CompleteJob(completed, metadata=md)
        with done.get_lock():
            done.value += 1


async def _until(event: asyncio.Event) -> Any:
    """No messages; half-close once `event` is set (never cancel a delivered job)."""
    await event.wait()
    return
    yield


async def daemon_process(
    address: str, names: list[str], done: Any, stop: Any, ready: Any, go: Any
) -> None:
    async with aio.insecure_channel(address) as channel:
        await channel.channel_ready()
        stub = pd_grpc.ProvisionerDaemonStub(channel)
        with ready.get_lock():
            ready.value += 1
        while not go.is_set():  # the clock starts once every process is up
            await asyncio.sleep(0.005)
        loops = [asyncio.ensure_future(daemon_loop(stub, n, done, stop)) for n in names]
        while not stop.is_set():
            await asyncio.sleep(0.05)
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)


def _daemon_main(address: str, names: list[str], done: Any, stop: Any, ready: Any, go: Any) -> None:
    run_async_in_process(daemon_process, address, names, done, stop, ready, go)


def throughput(options: Options, results: Results, daemons: int) -> None:
    count = options.scale(2000, 300)
    with waystation_server(options) as server:
        with CTX.Pool(1) as pool:
            pool.apply(run_async_in_process, (queue_imports, server.address, count, 16))
        done, stop, ready, go = CTX.Value("i", 0), CTX.Event(), CTX.Value("i", 0), CTX.Event()
        names = [f"bench-d{i}" for i in range(daemons)]
        groups = [names[i::DAEMON_PROCESSES] for i in range(DAEMON_PROCESSES)]
        procs = [
            CTX.Process(
                target=_daemon_main,
                args=(server.address, g, done, stop, ready, go),
                daemon=True,
            )
            for g in groups
            if g
        ]
        for p in procs:
            p.start()
        while ready.value < len(procs):
            time.sleep(0.01)
        before, start = cpu.sample(), time.perf_counter()
        go.set()
        deadline = start + 900
        while done.value < count:
            if time.perf_counter() > deadline:
                raise TimeoutError(f"only {done.value} of {count} imports finished")
            time.sleep(0.005)
        end, after = time.perf_counter(), cpu.sample()
        stop.set()
        for p in procs:
            p.join(10)
    note = f"{count} imports, 20 log lines each"
    rate, used = count / (end - start), cpu.spent(before, after, count)
    results.add("provision", f"import jobs/s, {daemons} daemons", rate, "jobs/s", note, used)


def run(options: Options, results: Results) -> None:
    for daemons in (1, 10):
        throughput(options, results, daemons)
