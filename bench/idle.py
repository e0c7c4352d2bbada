"""Many idle runners: each holds a RunnerConfig stream and a waiting RunnerJobStream.

Server memory per idle runner (RSS growth over the idle server, divided by
the runner count), and the queue-to-assignment latency of jobs queued while
they all wait.

Runners come up at the pace the server accepts them (a bounded number of
registrations in flight per process) and, like the runner agent, reconnect
after a CANCELLED or UNAVAILABLE stream. Both matter: grpc-core rejects (as
CANCELLED, before the servicer sees them) incoming calls while more than
`grpc.server.max_pending_requests` (default 1000) of them wait for the
asyncio server to accept them, and a burst of thousands of streams exceeds
that. Reconnects are counted and printed in the figure's note.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import time
from typing import Any

import grpc
from grpc import aio

from bench.common import (
    CTX,
    Options,
    Results,
    percentile,
    rss_kib,
    run_async_in_process,
    waystation_server,
)
from bench.jobs import assign_latencies, queue_jobs, run_jobs
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.waystation.v1 import admin_pb2 as admin
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc

PER_CHANNEL = 1000  # runners per HTTP/2 connection (two streams each)
PROCESSES = 2
REGISTERING = 100  # registrations in flight per process: well under the server's backlog
RETRY_PAUSE = 0.5  # seconds before a runner reconnects after its stream was refused
RETRIED = (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
STALL = 60.0  # seconds without progress before the scenario gives up


class Counters:
    """Shared between the runner processes and the scenario."""

    def __init__(self) -> None:
        self.parked = CTX.Value("i", 0)  # runners whose first job request is sent
        self.done = CTX.Value("i", 0)  # jobs completed by the idle runners
        self.retries = CTX.Value("i", 0)  # streams refused or broken, then reopened
        self.failed = CTX.Value("i", 0)  # runners that gave up on an unexpected error
        self.receipts = CTX.Queue()  # (job id, time) as each assignment arrives

    @staticmethod
    def bump(value: Any) -> None:
        with value.get_lock():
            value.value += 1


def _park(parked: list[bool], counters: Counters) -> None:
    """Count the runner as parked (waiting for work) on its first job stream."""
    if not parked[0]:
        parked[0] = True
        Counters.bump(counters.parked)


async def _register(stub: Any, name: str) -> Any:
    """Open the runner's config stream (kept open) and wait for its first config."""
    call = stub.RunnerConfig()
    opening = vs.RunnerConfigRequest.Open(runner=vs.Runner(id=name))
    await call.write(vs.RunnerConfigRequest(open=opening))
    await call.read()
    return call


def _refused(exc: aio.AioRpcError) -> bool:
    """A stream the server refused or dropped, which the runner agent reconnects after.

    A write to a stream the server already refused fails locally in grpc-python as
    INTERNAL "Internal error from Core" (debug: Failed "execute_batch"): the same
    refusal, seen late."""
    if exc.code() in RETRIED:
        return True
    return exc.code() == grpc.StatusCode.INTERNAL and exc.details() == "Internal error from Core"


async def _idle_runner(
    stub: Any, name: str, stop: Any, gate: asyncio.Semaphore, counters: Counters
) -> None:
    parked = [False]
    while not stop.is_set():
        config = None
        try:
            async with gate:
                config = await _register(stub, name)
            done = functools.partial(Counters.bump, counters.done)
            waiting = functools.partial(_park, parked, counters)
            await run_jobs(stub, name, done, stop, waiting, counters.receipts)
        except aio.AioRpcError as exc:
            if not _refused(exc):
                print(f"idle runner {name}: {exc.code().name}: {exc.details()}", file=sys.stderr)
                Counters.bump(counters.failed)
                return
            Counters.bump(counters.retries)
            await asyncio.sleep(RETRY_PAUSE)
        finally:
            if config is not None:
                config.cancel()


async def _process(address: str, names: list[str], stop: Any, counters: Counters) -> None:
    channels = [
        aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(0, len(names), PER_CHANNEL)
    ]
    gate = asyncio.Semaphore(REGISTERING)
    tasks = [
        asyncio.ensure_future(
            _idle_runner(
                vs_grpc.VagrantStub(channels[i // PER_CHANNEL]), name, stop, gate, counters
            )
        )
        for i, name in enumerate(names)
    ]
    while not stop.is_set():
        await asyncio.sleep(0.1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close(None)


def _main(address: str, names: list[str], stop: Any, counters: Counters) -> None:
    run_async_in_process(_process, address, names, stop, counters)


async def _online(address: str) -> int:
    async with aio.insecure_channel(address) as channel:
        found = await admin_grpc.AdminStub(channel).ListRunners(admin.ListRunnersRequest())
        return sum(1 for r in found.runners if r.online)


def _wait(what: str, progress: Any, target: int, counters: Counters) -> None:
    """Until progress() reaches target; fail once it stops moving for STALL seconds."""
    last, moved = -1, time.perf_counter()
    while (now := progress()) < target:
        if counters.failed.value:
            raise RuntimeError(f"{counters.failed.value} idle runners failed (see stderr)")
        if now != last:
            last, moved = now, time.perf_counter()
        elif time.perf_counter() - moved > STALL:
            raise TimeoutError(
                f"{what}: stuck at {now} of {target} for {STALL:.0f}s "
                f"({counters.retries.value} reconnects)"
            )
        time.sleep(0.5)


def measure(options: Options, results: Results, count: int) -> None:
    jobs = options.scale(200, 50)
    counters = Counters()
    with waystation_server(options) as server:
        assert server.proc is not None
        time.sleep(1.0)
        before = rss_kib(server.proc.pid)
        stop = CTX.Event()
        names = [f"idle-{i}" for i in range(count)]
        procs = [
            CTX.Process(
                target=_main,
                args=(server.address, names[i::PROCESSES], stop, counters),
                daemon=True,
            )
            for i in range(PROCESSES)
        ]
        for p in procs:
            p.start()
        try:
            with CTX.Pool(1) as pool:
                start = time.perf_counter()

                def online() -> int:
                    return int(pool.apply(run_async_in_process, (_online, server.address)))

                _wait("runners online", online, count, counters)
                _wait("job streams open", lambda: int(counters.parked.value), count, counters)
                up = time.perf_counter() - start
                time.sleep(2.0)  # the last job streams reach the server and park
                after = rss_kib(server.proc.pid)
                ids = pool.apply(run_async_in_process, (queue_jobs, server.address, jobs, 1, 20.0))
                _wait("jobs done", lambda: int(counters.done.value), jobs, counters)
                lat = assign_latencies(pool, server.address, ids, counters.receipts)
        finally:
            stop.set()
            for p in procs:
                p.join(30)
    note = f"all up in {up:.0f}s, {counters.retries.value} reconnects"
    results.add(
        "idle",
        f"server RSS per idle runner, {count} runners",
        (after - before) / count,
        "KiB",
        note,
    )
    results.add(
        "idle",
        f"queue->assign p99, {count} idle runners",
        percentile(lat, 99),
        "ms",
        f"{jobs} jobs at 20/s, queued to the runner's receipt",
    )


def run(options: Options, results: Results) -> None:
    for count in (1000, 5000, 10000) if not options.quick else (1000, 2000):
        measure(options, results, count)
