"""Many idle runners: each holds a RunnerConfig stream and a waiting RunnerJobStream.

Server memory per idle runner (RSS growth over the idle server, divided by
the runner count), and the queue-to-assignment latency of jobs queued while
they all wait.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

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
from bench.jobs import assign_latencies, queue_jobs, register, run_jobs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.waystation.v1 import admin_pb2 as admin
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc

PER_CHANNEL = 1000  # runners per HTTP/2 connection
PROCESSES = 2


async def _idle_runner(stub: Any, name: str, stop: Any) -> None:
    config = await register(stub, name)
    try:
        await run_jobs(stub, name, lambda: None, stop)
    finally:
        config.cancel()


async def _process(address: str, names: list[str], stop: Any) -> None:
    channels = [
        aio.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range(0, len(names), PER_CHANNEL)
    ]
    tasks = []
    for i, name in enumerate(names):
        stub = vs_grpc.VagrantStub(channels[i // PER_CHANNEL])
        tasks.append(asyncio.ensure_future(_idle_runner(stub, name, stop)))
        if i % 200 == 199:
            await asyncio.sleep(0.05)  # do not open thousands of streams in one burst
    while not stop.is_set():
        await asyncio.sleep(0.1)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for channel in channels:
        await channel.close(None)


def _main(address: str, names: list[str], stop: Any) -> None:
    run_async_in_process(_process, address, names, stop)


async def _online(address: str) -> int:
    async with aio.insecure_channel(address) as channel:
        found = await admin_grpc.AdminStub(channel).ListRunners(admin.ListRunnersRequest())
        return sum(1 for r in found.runners if r.online)


def measure(options: Options, results: Results, count: int) -> None:
    with waystation_server(options) as server:
        assert server.proc is not None
        time.sleep(1.0)
        before = rss_kib(server.proc.pid)
        stop = CTX.Event()
        names = [f"idle-{i}" for i in range(count)]
        procs = [
            CTX.Process(target=_main, args=(server.address, names[i::PROCESSES], stop), daemon=True)
            for i in range(PROCESSES)
        ]
        for p in procs:
            p.start()
        deadline = time.perf_counter() + 600
        with CTX.Pool(1) as pool:
            while pool.apply(run_async_in_process, (_online, server.address)) < count:
                if time.perf_counter() > deadline:
                    raise TimeoutError("runners did not all register")
                time.sleep(1.0)
            time.sleep(2.0 + count / 2000)  # their job streams open after registering
            after = rss_kib(server.proc.pid)
            jobs = options.scale(200, 50)
            ids = pool.apply(run_async_in_process, (queue_jobs, server.address, jobs, 1, 20.0))
            time.sleep(1.0)
            lat = pool.apply(run_async_in_process, (assign_latencies, server.address, ids))
        stop.set()
        for p in procs:
            p.join(30)
    results.add(
        "idle", f"server RSS per idle runner, {count} runners", (after - before) / count, "KiB"
    )
    results.add("idle", f"queue->assign p99, {count} idle runners", percentile(lat, 99), "ms")


def run(options: Options, results: Results) -> None:
    for count in (1000, 5000, 10000) if not options.quick else (1000, 2000):
        measure(options, results, count)
