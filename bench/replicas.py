"""Server replicas sharing one PostgreSQL (issue #23): what scaling out gives and costs.

1. Throughput: 1, 2 and 3 replicas on one database, 10 runner streams spread
   over them, noop jobs queued round-robin through all of them; jobs/s from
   the first queued to the last completed, and the machine's CPU a job.
2. Cross-replica assignment: two replicas, every runner idle on the second,
   jobs queued on the first at 100 jobs/s; from each job's queueing to its
   assignment's arrival at the runner (target: p99 under 20 ms).
3. Cross-replica output: a runner on the first replica writes a line every
   50 ms, one watcher follows the job on the same replica and one on the
   second; how long each line took to reach each watcher (target, the second:
   p99 under 100 ms).

Replicas learn of each other's work by polling the database (`server run
--poll-interval`, 2 s by default), so 2 and 3 are bound by that interval
until cross-replica wake-ups (LISTEN/NOTIFY) land. The database is `--db`, or
a throwaway PostgreSQL cluster (scripts/pg-throwaway) with fsync as the
bench's option says.
"""

from __future__ import annotations

import asyncio
import functools
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from grpc import aio

from bench import cpu
from bench.common import CTX, Options, Results, percentile, run_async_in_process
from bench.jobs import (
    _count,
    _wait_done,
    _warm,
    assign_latencies,
    queue_jobs,
    register,
    run_jobs,
)
from bench.peers import throwaway_postgres
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.testing import ServerProcess, noop_job

Req = vs.RunnerJobStreamRequest
Terminal = vs.GetJobStreamResponse.Terminal
SCENARIO = "replicas"
COUNTS = (1, 2, 3)
STREAMS = 10  # runner streams, as `jobs` with 10
RUNNER_PROCESSES = 2  # the machine has 2 cores
RATE = 100.0  # jobs/s offered in the cross-replica latency run
LINE_EVERY = 0.05  # seconds between the lines of the output run
ASSIGN_TARGET_MS = 20.0
LAG_TARGET_MS = 100.0

# The figures' names; report() renders them as their own table.
ASSIGN_P50 = "queue->runner p50, queued on replica 1, runner on replica 2"
ASSIGN_P99 = "queue->runner p99, queued on replica 1, runner on replica 2"
LAG_SAME_P99 = "watcher lag p99, output written and watched on one replica"
LAG_OTHER_P50 = "watcher lag p50, output written on replica 1, watched on replica 2"
LAG_OTHER_P99 = "watcher lag p99, output written on replica 1, watched on replica 2"
TARGETS_MS = {ASSIGN_P99: ASSIGN_TARGET_MS, LAG_OTHER_P99: LAG_TARGET_MS}


def throughput_name(replicas: int) -> str:
    return f"noop jobs/s, {replicas} replica{'s' if replicas > 1 else ''}"


@contextmanager
def database(options: Options) -> Iterator[str]:
    """`--db`, or a throwaway PostgreSQL cluster for this run."""
    if options.db:
        if not options.db.startswith("postgresql"):
            raise SystemExit("replicas: --db must be a postgresql:// URL")
        yield options.db
    else:
        with throwaway_postgres(options) as url:
            yield url


@contextmanager
def replicas(options: Options, url: str, count: int) -> Iterator[list[str]]:
    """`count` `waystation server run` processes on one database; their addresses.
    They start one after the other: the first applies the migrations."""
    flags = [] if options.fsync else ["--no-fsync"]
    with tempfile.TemporaryDirectory(prefix="ws-bench-replicas-") as tmp, ExitStack() as stack:
        addresses = []
        for i in range(count):
            server = ServerProcess(Path(tmp) / f"replica-{i + 1}", url, *flags)
            server.start()
            stack.callback(server.stop)
            addresses.append(server.address)
        yield addresses


# -- clients ---------------------------------------------------------------------------


async def _runners(
    placed: list[tuple[str, list[str]]], done: Any, stop: Any, receipts: Any
) -> None:
    """Runner streams, each on the replica it was placed on, until `stop`."""
    channels = [aio.insecure_channel(address) for address, _ in placed]
    try:
        configs, workers = [], []
        for channel, (_, names) in zip(channels, placed, strict=True):
            stub = vs_grpc.VagrantStub(channel)
            for name in names:
                configs.append(await register(stub, name))
                on_done = functools.partial(_count, done)
                workers.append(
                    asyncio.ensure_future(run_jobs(stub, name, on_done, stop, receipts=receipts))
                )
        while not stop.is_set():
            await asyncio.sleep(0.05)
        for task in workers:
            task.cancel()
        for call in configs:
            call.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    finally:
        for channel in channels:
            await channel.close(None)


def _runner_main(placed: list[tuple[str, list[str]]], done: Any, stop: Any, receipts: Any) -> None:
    run_async_in_process(_runners, placed, done, stop, receipts)


def start_runners(
    addresses: list[str], prefix: str, done: Any, stop: Any, receipts: Any = None
) -> list[Any]:
    """STREAMS runner streams spread round-robin over `addresses`, in RUNNER_PROCESSES."""
    placed: list[list[tuple[str, list[str]]]] = [[] for _ in range(RUNNER_PROCESSES)]
    for i in range(STREAMS):
        address = addresses[i % len(addresses)]
        group = placed[i % RUNNER_PROCESSES]
        for entry in group:
            if entry[0] == address:
                entry[1].append(f"{prefix}-{i}")
                break
        else:
            group.append((address, [f"{prefix}-{i}"]))
    procs = [
        CTX.Process(target=_runner_main, args=(p, done, stop, receipts), daemon=True)
        for p in placed
        if p
    ]
    for p in procs:
        p.start()
    return procs


async def queue_round_robin(addresses: list[str], count: int, inflight: int) -> int:
    """Queue `count` noop jobs, the i-th through replica i mod n, `inflight` calls at a time."""
    channels = [aio.insecure_channel(a) for a in addresses]
    stubs = [vs_grpc.VagrantStub(c) for c in channels]
    next_index = 0

    async def worker() -> None:
        nonlocal next_index
        while next_index < count:
            stub = stubs[next_index % len(stubs)]
            next_index += 1
            await stub.QueueJob(vs.QueueJobRequest(job=noop_job()))

    try:
        await asyncio.gather(*(worker() for _ in range(inflight)))
    finally:
        for channel in channels:
            await channel.close(None)
    return count


# -- 1. throughput ---------------------------------------------------------------------


def throughput(options: Options, results: Results, url: str, count: int) -> None:
    jobs = options.scale(5000, 1000)
    with replicas(options, url, count) as addresses:
        done, stop = CTX.Value("i", 0), CTX.Event()
        procs = start_runners(addresses, f"tp{count}", done, stop)
        time.sleep(1.0 + STREAMS * 0.02)
        try:
            with CTX.Pool(1) as pool:
                pool.apply(_warm)
                before, start = cpu.sample(), time.perf_counter()
                queued = pool.apply_async(
                    run_async_in_process, (queue_round_robin, addresses, jobs, 64)
                )
                end = _wait_done(done, jobs, 600)
                after = cpu.sample()
                queued.get(60)
        finally:
            stop.set()
            for p in procs:
                p.join(10)
    note = f"{jobs} jobs, {STREAMS} runner streams over {count}, queued round-robin"
    rate = jobs / (end - start)
    results.add(
        SCENARIO, throughput_name(count), rate, "jobs/s", note, cpu.spent(before, after, jobs)
    )


# -- 2. a job queued on one replica, the idle runner on another --------------------------


def cross_assign(options: Options, results: Results, addresses: list[str]) -> None:
    first, second = addresses[0], addresses[1]
    count = int(options.scale(20, 5) * RATE)
    done, stop, receipts = CTX.Value("i", 0), CTX.Event(), CTX.Queue()
    procs = start_runners([second], "cross", done, stop, receipts)
    time.sleep(1.5)
    try:
        with CTX.Pool(1) as pool:
            ids = pool.apply(run_async_in_process, (queue_jobs, first, count, 1, RATE))
            _wait_done(done, count, 300)
            lat = assign_latencies(pool, first, ids, receipts)
    finally:
        stop.set()
        for p in procs:
            p.join(10)
    note = f"{count} jobs at {RATE:.0f}/s, {STREAMS} idle runners, queued to the runner's receipt"
    results.add(SCENARIO, ASSIGN_P50, percentile(lat, 50), "ms", note)
    results.add(SCENARIO, ASSIGN_P99, percentile(lat, 99), "ms", note)


# -- 3. output written on one replica, watched on another --------------------------------


async def _watch(address: str, job_id: str, ready: Any) -> list[float]:
    """Follow the job; per line, ms from its writing (the time in it) to its receipt."""
    lags: list[float] = []
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        first = True
        async for response in stub.GetJobStream(vs.GetJobStreamRequest(job_id=job_id)):
            if first:
                first = False
                ready.set()
            kind = response.WhichOneof("event")
            if kind == "terminal":
                now = time.time_ns() / 1e6
                lags += [now - int(e.line.msg) / 1e3 for e in response.terminal.events]
            elif kind == "complete":
                break
    return lags


async def _write(address: str, lines: int, ready: list[Any]) -> str:
    """Take the job as runner `writer`, then write a line (its time, us) every LINE_EVERY."""
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        config = await register(stub, "writer")
        call = stub.RunnerJobStream()  # type: ignore[call-arg]  # written to below
        await call.write(Req(request=Req.Request(runner_id="writer")))
        assignment: Any = await call.read()
        await call.write(Req(ack=Req.Ack()))
        for event in ready:
            while not event.is_set():
                await asyncio.sleep(0.01)
        await asyncio.sleep(0.5)  # both watchers past the job's (empty) history
        for _ in range(lines):
            line = Terminal.Event.Line(msg=str(time.time_ns() // 1000))
            await call.write(Req(terminal=Terminal(events=[Terminal.Event(line=line)])))
            await asyncio.sleep(LINE_EVERY)
        await call.write(Req(complete=Req.Complete()))
        await call.done_writing()
        await call.read()
        config.cancel()
        return str(assignment.assignment.job.id)


async def _queue_for_writer(address: str) -> str:
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        return (await stub.QueueJob(vs.QueueJobRequest(job=noop_job("writer")))).job_id


def cross_output(options: Options, results: Results, addresses: list[str]) -> None:
    first, second = addresses[0], addresses[1]
    lines = options.scale(400, 100)
    with CTX.Pool(3) as pool:
        manager = CTX.Manager()
        ready = [manager.Event(), manager.Event()]
        job_id = pool.apply(run_async_in_process, (_queue_for_writer, first))
        watchers = [
            pool.apply_async(run_async_in_process, (_watch, address, job_id, event))
            for address, event in zip((first, second), ready, strict=True)
        ]
        writer = pool.apply_async(run_async_in_process, (_write, first, lines, ready))
        writer.get(600)
        same, other = (w.get(600) for w in watchers)
        manager.shutdown()
    every = f"one every {LINE_EVERY * 1000:.0f} ms"
    note = f"{lines} lines, {every}, from its writing to the watcher's receipt"
    if len(other) != lines or len(same) != lines:
        note += f" (saw {len(same)} and {len(other)})"
    results.add(SCENARIO, LAG_SAME_P99, percentile(same, 99), "ms", note)
    results.add(SCENARIO, LAG_OTHER_P50, percentile(other, 50), "ms", note)
    results.add(SCENARIO, LAG_OTHER_P99, percentile(other, 99), "ms", note)


def run(options: Options, results: Results) -> None:
    with database(options) as url:
        for count in COUNTS:
            throughput(options, results, url, count)
        with replicas(options, url, 2) as addresses:
            cross_assign(options, results, addresses)
            cross_output(options, results, addresses)
