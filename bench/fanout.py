"""One job's output to many watchers: 100 GetJobStream followers, 100,000 lines.

Line deliveries per second across all watchers (from the first line written
to the last watcher's Complete), and how far the last watcher lagged behind
the job's end.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from grpc import aio

from bench.common import CTX, Options, Results, run_async_in_process, waystation_server
from bench.jobs import noop_job, register
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc

Req = vs.RunnerJobStreamRequest
Terminal = vs.GetJobStreamResponse.Terminal
PER_BATCH = 100


async def _watchers(address: str, job_id: str, count: int, ready: Any) -> list[tuple[int, float]]:
    """Follow the job `count` times; each returns (lines seen, time of Complete)."""
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        opened = 0

        async def follow() -> tuple[int, float]:
            nonlocal opened
            lines = 0
            first = True
            async for response in stub.GetJobStream(vs.GetJobStreamRequest(job_id=job_id)):
                if first:
                    first = False
                    opened += 1
                    if opened == count:
                        ready.set()
                kind = response.WhichOneof("event")
                if kind == "terminal":
                    lines += len(response.terminal.events)
                elif kind == "complete":
                    return lines, time.time()
            return lines, time.time()

        return list(await asyncio.gather(*(follow() for _ in range(count))))


async def _produce(address: str, lines: int, ready: list[Any]) -> tuple[float, float]:
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        config = await register(stub, "writer")
        call = stub.RunnerJobStream()  # type: ignore[call-arg]  # written to below
        await call.write(Req(request=Req.Request(runner_id="writer")))
        await call.read()
        await call.write(Req(ack=Req.Ack()))
        for event_ready in ready:  # every watcher is following
            event_ready.wait()
        event = Terminal.Event(line=Terminal.Event.Line(msg="x" * 60))
        batch = Terminal(events=[event] * PER_BATCH)
        begin = time.time()
        for _ in range(lines // PER_BATCH):
            await call.write(Req(terminal=batch))
        await call.write(Req(complete=Req.Complete()))
        await call.done_writing()
        await call.read()
        config.cancel()
        return begin, time.time()


async def _queue(address: str) -> str:
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        return (await stub.QueueJob(vs.QueueJobRequest(job=noop_job()))).job_id


def run(options: Options, results: Results) -> None:
    watchers = 100
    lines = options.scale(100_000, 20_000)
    with waystation_server(options) as server, CTX.Pool(3) as pool:
        job_id = pool.apply(run_async_in_process, (_queue, server.address))
        manager = CTX.Manager()
        ready = [manager.Event(), manager.Event()]
        halves = [
            pool.apply_async(run_async_in_process, (_watchers, server.address, job_id, n, r))
            for n, r in zip((watchers // 2, watchers - watchers // 2), ready, strict=True)
        ]
        producer = pool.apply_async(run_async_in_process, (_produce, server.address, lines, ready))
        begin, end = producer.get(1800)
        seen = [w for half in halves for w in half.get(1800)]
    total = sum(n for n, _ in seen)
    last = max(t for _, t in seen)
    if total != watchers * lines:
        print(f"  fanout: watchers saw {total} lines, expected {watchers * lines}")
    results.add(
        "fanout",
        f"line deliveries/s, {watchers} watchers",
        total / (last - begin),
        "lines/s",
        f"{lines} lines",
    )
    results.add("fanout", "last watcher's lag behind the job's end", (last - end) * 1000, "ms")
