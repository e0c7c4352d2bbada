"""End-to-end noop jobs: QueueJob -> RunnerJobStream (assign, ack, complete) -> SUCCESS.

Runners are processes holding real streams; a queuer process queues the jobs.
Throughput with 1, 10 and 50 runner streams; then queue-to-assignment latency
at a fixed offered load of 100 jobs/s with idle runners waiting.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from grpc import aio

from bench import cpu
from bench.common import CTX, Options, Results, percentile, run_async_in_process, waystation_server
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc

Req = vs.RunnerJobStreamRequest
RUNNER_PROCESSES = 2  # the machine has 2 cores: more processes only add switching


def noop_job() -> vs.Job:
    return vs.Job(target_runner=vs.Ref.Runner(any=vs.Ref.RunnerAny()), noop=vs.Job.Noop())


async def register(stub: Any, runner_id: str) -> Any:
    """Open (and keep open) the runner's config stream; wait for its first config."""
    opened = asyncio.Event()

    async def requests() -> Any:
        yield vs.RunnerConfigRequest(
            open=vs.RunnerConfigRequest.Open(runner=vs.Runner(id=runner_id))
        )
        await asyncio.Event().wait()

    call = stub.RunnerConfig(requests())
    await call.read()
    opened.set()
    return call


async def run_jobs(
    stub: Any,
    runner_id: str,
    on_done: Callable[[], None],
    stop: Any,
    on_waiting: Callable[[], None] = lambda: None,
    receipts: Any = None,
) -> None:
    """One runner stream after another: take a job, ack it, complete it.
    `receipts` (a queue) gets (job id, wall-clock us) as each assignment arrives."""
    while not stop.is_set():
        call = stub.RunnerJobStream()
        await call.write(Req(request=Req.Request(runner_id=runner_id)))
        on_waiting()
        response = await call.read()
        if response is aio.EOF:  # type: ignore[attr-defined]
            continue
        if receipts is not None:
            receipts.put((response.assignment.job.id, time.time_ns() // 1000))
        await call.write(Req(ack=Req.Ack()))
        await call.write(Req(complete=Req.Complete()))
        await call.done_writing()
        await call.read()  # EOF: the server closed the stream
        on_done()


async def runner_process(
    address: str, names: list[str], done: Any, stop: Any, receipts: Any
) -> None:
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        configs = [await register(stub, name) for name in names]
        workers = [
            asyncio.ensure_future(
                run_jobs(stub, name, lambda: _count(done), stop, receipts=receipts)
            )
            for name in names
        ]
        while not stop.is_set():
            await asyncio.sleep(0.05)
        for task in workers:
            task.cancel()
        for call in configs:
            call.cancel()
        await asyncio.gather(*workers, return_exceptions=True)


def _count(done: Any) -> None:
    with done.get_lock():
        done.value += 1


def _runner_main(address: str, names: list[str], done: Any, stop: Any, receipts: Any) -> None:
    run_async_in_process(runner_process, address, names, done, stop, receipts)


async def queue_jobs(address: str, count: int, inflight: int, rate: float) -> list[str]:
    """Queue `count` jobs: as fast as `inflight` calls allow, or at `rate` per second."""
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        ids: list[str] = []
        if rate:
            start = time.perf_counter()
            pending = []
            for i in range(count):
                delay = start + i / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                pending.append(
                    asyncio.ensure_future(stub.QueueJob(vs.QueueJobRequest(job=noop_job())))
                )
            return [r.job_id for r in await asyncio.gather(*pending)]
        next_index = 0

        async def worker() -> None:
            nonlocal next_index
            while next_index < count:
                next_index += 1
                ids.append((await stub.QueueJob(vs.QueueJobRequest(job=noop_job()))).job_id)

        await asyncio.gather(*(worker() for _ in range(inflight)))
        return ids


async def queue_times(address: str, ids: list[str]) -> list[int]:
    """Each job's queue time (us, the server's clock)."""
    async with aio.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        jobs = [await stub.GetJob(vs.GetJobRequest(job_id=i)) for i in ids]
    return [j.queue_time.ToMicroseconds() for j in jobs]


def assign_latencies(pool: Any, address: str, ids: list[str], receipts: Any) -> list[float]:
    """Per job, from its queueing on the server to its assignment's arrival at the
    runner (ms). Server and runners share this machine's clock. The server's own
    assign time says nothing here: a job handed over as it is queued has the same
    queue and assign times, before the commit and the trip to the runner."""
    queued = pool.apply(run_async_in_process, (queue_times, address, ids))
    arrived = dict(receipts.get(timeout=60) for _ in ids)
    return [(arrived[i] - q) / 1000 for i, q in zip(ids, queued, strict=True)]


def _warm() -> None:
    """Nothing: a call that returns once the pool's process is up."""


def _start_runners(
    address: str, streams: int, done: Any, stop: Any, receipts: Any = None
) -> list[Any]:
    names = [f"bench-{i}" for i in range(streams)]
    groups = [names[i::RUNNER_PROCESSES] for i in range(RUNNER_PROCESSES)]
    procs = [
        CTX.Process(target=_runner_main, args=(address, g, done, stop, receipts), daemon=True)
        for g in groups
        if g
    ]
    for p in procs:
        p.start()
    return procs


def _wait_done(done: Any, count: int, timeout: float) -> float:
    deadline = time.perf_counter() + timeout
    while done.value < count:
        if time.perf_counter() > deadline:
            raise TimeoutError(f"only {done.value} of {count} jobs finished")
        time.sleep(0.005)
    return time.perf_counter()


def throughput(options: Options, results: Results, streams: int) -> None:
    count = options.scale(5000, 1000)
    with waystation_server(options) as server:
        rate, used = jobs_per_second(server.address, streams, count)
    name = f"noop jobs/s, {streams} runner streams"
    results.add("jobs", name, rate, "jobs/s", f"{count} jobs", used)


def jobs_per_second(address: str, streams: int, count: int) -> tuple[float, cpu.Spent]:
    """Queue `count` noop jobs to the server at `address`, run them on `streams`
    runner streams; jobs/s from the first queued to the last completed, and
    what the machine spent meanwhile."""
    done, stop = CTX.Value("i", 0), CTX.Event()
    procs = _start_runners(address, streams, done, stop)
    time.sleep(1.0 + streams * 0.02)  # let every runner register and wait
    with CTX.Pool(1) as pool:
        # The queuer process starts (and imports) before the clock does, as
        # the peers' producers do.
        pool.apply(_warm)
        before, start = cpu.sample(), time.perf_counter()
        queued = pool.apply_async(run_async_in_process, (queue_jobs, address, count, 64, 0.0))
        end = _wait_done(done, count, 600)
        after = cpu.sample()
        queued.get(60)
    stop.set()
    for p in procs:
        p.join(10)
    return count / (end - start), cpu.spent(before, after, count)


def latency(options: Options, results: Results) -> None:
    seconds = options.scale(20, 5)
    rate = 100.0
    count = int(seconds * rate)
    with waystation_server(options) as server:
        done, stop, receipts = CTX.Value("i", 0), CTX.Event(), CTX.Queue()
        procs = _start_runners(server.address, 10, done, stop, receipts)
        time.sleep(1.5)
        with CTX.Pool(1) as pool:
            ids = pool.apply(run_async_in_process, (queue_jobs, server.address, count, 1, rate))
            _wait_done(done, count, 300)
            lat = assign_latencies(pool, server.address, ids, receipts)
        stop.set()
        for p in procs:
            p.join(10)
    note = "queued to the runner's receipt"
    results.add("jobs", "queue->assign p50 at 100 jobs/s", percentile(lat, 50), "ms", note)
    results.add("jobs", "queue->assign p99 at 100 jobs/s", percentile(lat, 99), "ms", note)


def run(options: Options, results: Results) -> None:
    for streams in (1, 10, 50):
        throughput(options, results, streams)
    latency(options, results)
