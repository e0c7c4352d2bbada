"""The physical limit on this machine: bare grpc.aio, no waystation at all.

A unary echo with 64 calls in flight, and a bidirectional ping-pong, between
two processes on loopback. Our RPCs are measured against these.

And the protocol's own floor: the `jobs` scenario's clients (one queuer, ten
runner streams) against a bare grpc.aio server that implements just QueueJob,
RunnerConfig and RunnerJobStream on an in-memory queue, with no storage, no
validation and no timers. No job server speaking this protocol in Python can
do better on this machine; the gap to it is what storage and the engine cost.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import grpc
from grpc import aio

from bench import jobs
from bench.common import CTX, Options, Results, free_port, processes, run_async_in_process
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.server.unimplemented import fill_unimplemented

SERVICE = "bench.Echo"
UNARY = "unary echo, 64 in flight"
FLOOR = "protocol in memory, noop jobs/s, 10 runner streams"
Response = vs.RunnerJobStreamResponse


def _identity(data: bytes) -> bytes:
    return data


async def _serve(port: int, ready: object, stop: object) -> None:
    async def echo(request: bytes, context: aio.ServicerContext[bytes, bytes]) -> bytes:
        return request

    async def ping(requests: object, context: aio.ServicerContext[bytes, bytes]) -> object:
        async for message in requests:  # type: ignore[attr-defined]
            yield message

    handler = grpc.method_handlers_generic_handler(
        SERVICE,
        {
            "Echo": grpc.unary_unary_rpc_method_handler(echo, _identity, _identity),
            "Ping": grpc.stream_stream_rpc_method_handler(ping, _identity, _identity),
        },
    )
    server = aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    ready.set()  # type: ignore[attr-defined]
    while not stop.is_set():  # type: ignore[attr-defined]
        await asyncio.sleep(0.1)
    await server.stop(0)


def _server_main(port: int, ready: object, stop: object) -> None:
    run_async_in_process(_serve, port, ready, stop)


async def _unary_client(port: int, seconds: float, inflight: int) -> int:
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        echo = channel.unary_unary(f"/{SERVICE}/Echo", _identity, _identity)
        payload = b"x" * 32
        deadline = time.perf_counter() + seconds
        count = 0

        async def worker() -> None:
            nonlocal count
            while time.perf_counter() < deadline:
                await echo(payload)
                count += 1

        await asyncio.gather(*(worker() for _ in range(inflight)))
        return count


async def _bidi_client(port: int, seconds: float) -> int:
    async with aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        ping = channel.stream_stream(f"/{SERVICE}/Ping", _identity, _identity)
        call = ping()  # type: ignore[call-arg]  # written to below
        deadline = time.perf_counter() + seconds
        count = 0
        while time.perf_counter() < deadline:
            await call.write(b"ping")
            await call.read()
            count += 1
        await call.done_writing()
        return count


class _InMemoryVagrant:
    """The three RPCs the `jobs` clients use, on an asyncio queue: nothing persists."""

    def __init__(self) -> None:
        self.queue: asyncio.Queue[vs.Job] = asyncio.Queue()
        self.count = 0
        fill_unimplemented(self, vs.DESCRIPTOR.services_by_name["Vagrant"])

    async def QueueJob(self, request: vs.QueueJobRequest, context: object) -> vs.QueueJobResponse:
        self.count += 1
        job = vs.Job(id=str(self.count), state=vs.Job.WAITING)
        job.MergeFrom(request.job)
        self.queue.put_nowait(job)
        return vs.QueueJobResponse(job_id=job.id)

    async def RunnerConfig(self, requests: Any, context: Any) -> None:
        await anext(aiter(requests))  # Open
        await context.write(vs.RunnerConfigResponse(config=vs.RunnerConfig()))
        async for _ in requests:
            pass

    async def RunnerJobStream(self, requests: Any, context: Any) -> None:
        reader = aiter(requests)
        await anext(reader)  # Request
        job = await self.queue.get()
        await context.write(Response(assignment=Response.JobAssignment(job=job)))
        async for message in reader:  # Ack, then Complete
            if message.WhichOneof("event") in ("complete", "error"):
                return


async def _serve_floor(port: int, ready: Any, stop: Any) -> None:
    server = aio.server()
    servicer = cast(vs_grpc.VagrantServicer, _InMemoryVagrant())
    vs_grpc.add_VagrantServicer_to_server(servicer, server)
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.1)
    await server.stop(0)


def _floor_main(port: int, ready: Any, stop: Any) -> None:
    run_async_in_process(_serve_floor, port, ready, stop)


@contextmanager
def _serving(main: Callable[[int, Any, Any], None]) -> Iterator[tuple[int, int]]:
    """`main(port, ready, stop)` serving in a process of its own: (port, pid)."""
    port = free_port()
    ready, stop = CTX.Event(), CTX.Event()
    server = CTX.Process(target=main, args=(port, ready, stop), daemon=True)
    server.start()
    try:
        ready.wait(30)
        assert server.pid is not None
        yield port, server.pid
    finally:
        stop.set()
        server.join(10)


@contextmanager
def floor_server() -> Iterator[tuple[str, int]]:
    """The in-memory protocol server in a process of its own: (address, pid)."""
    with _serving(_floor_main) as (port, pid):
        yield f"127.0.0.1:{port}", pid


def run(options: Options, results: Results) -> None:
    with _serving(_server_main) as (port, _):
        seconds = 3.0 if options.quick else 10.0
        (count,) = processes(_unary_client, [(port, seconds, 64)])
        results.add("ceiling", UNARY, count / seconds, "calls/s")
        (pings,) = processes(_bidi_client, [(port, seconds)])
        results.add("ceiling", "bidi ping-pong, one stream", pings / seconds, "round trips/s")
    with floor_server() as (address, _):
        count = options.scale(5000, 1000)
        rate, used = jobs.jobs_per_second(address, 10, count)
        note = "bare grpc.aio, no storage: the floor for any job server"
        results.add("ceiling", FLOOR, rate, "jobs/s", note, used)
