"""The physical limit on this machine: bare grpc.aio, no waystation at all.

A unary echo with 64 calls in flight, and a bidirectional ping-pong, between
two processes on loopback. Our RPCs are measured against these.
"""

from __future__ import annotations

import asyncio
import socket
import time

import grpc
from grpc import aio

from bench.common import CTX, Options, Results, processes, run_async_in_process

SERVICE = "bench.Echo"


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


def run(options: Options, results: Results) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready, stop = CTX.Event(), CTX.Event()
    server = CTX.Process(target=_server_main, args=(port, ready, stop), daemon=True)
    server.start()
    try:
        ready.wait(30)
        seconds = 3.0 if options.quick else 10.0
        (count,) = processes(_unary_client, [(port, seconds, 64)])
        results.add("ceiling", "unary echo, 64 in flight", count / seconds, "calls/s")
        (pings,) = processes(_bidi_client, [(port, seconds)])
        results.add("ceiling", "bidi ping-pong, one stream", pings / seconds, "round trips/s")
    finally:
        stop.set()
        server.join(10)
