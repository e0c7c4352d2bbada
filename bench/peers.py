"""The same noop workload through Celery 5 (Redis broker) and procrastinate (PostgreSQL).

Same job count as `jobs`: N noop jobs queued one call each, timed from the
first queue call until the last job has completed. The worker is a process of
its own, started and warmed up before the clock starts; the producer is
another process.

Celery runs as its users run it: a prefork pool of one worker process per core
(its default, `--concurrency` unset), twice: on Redis's default settings (no
AOF: an acknowledged task may be lost in a crash) and on Redis with
`appendonly yes`, `appendfsync always` (every write on disk before Redis
answers, as durable as our fsync on). Each row says which it is; the first is
the fair comparison for speed, the second for durability. procrastinate runs
with concurrency 10 (as `jobs` with 10 runner streams) on PostgreSQL with
fsync and synchronous commit, following the bench's fsync option.

The scenario installs what it needs (pip, into this interpreter: celery[redis],
procrastinate; Debian: redis-server, and PostgreSQL if missing, through
scripts/pg-throwaway) and starts throwaway servers on loopback.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
from psycopg import sql

from bench.common import Options, Results, free_port
from bench.cpu import Spent

ROOT = Path(__file__).resolve().parent.parent
PG_THROWAWAY = ROOT / "scripts" / "pg-throwaway"
WORKERS = 10  # procrastinate's concurrency, as `jobs` with 10 runner streams
CELERY_PROCESSES = os.cpu_count() or 1  # Celery's own default: one worker process per core
# The two Celery rows (bench/__main__.py compares `jobs` with each).
CELERY_DEFAULTS = "Celery 5 + Redis defaults (no AOF), noop tasks/s"
CELERY_FSYNC = "Celery 5 + Redis appendfsync always, noop tasks/s"
REDIS_SETTINGS = {
    CELERY_DEFAULTS: [],  # Redis's defaults: no AOF, RDB snapshots now and then
    CELERY_FSYNC: ["--appendonly", "yes", "--appendfsync", "always"],
}
INFLIGHT = 64  # queue calls in flight, as the `jobs` queuer
TIMEOUT = 600  # seconds for one measured run


def _pip(*packages: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", *packages], check=True)


def _apt(binary: str, package: str) -> None:
    if shutil.which(binary) is None:
        subprocess.run(["apt-get", "update", "-qq"], check=True)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", package],
            check=True,
            env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"},
        )


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


@contextmanager
def _process(cmd: list[str], log: Path, cwd: str, env: dict[str, str]) -> Iterator[None]:
    """A server or worker in its own process group, stopped (SIGTERM, then SIGKILL) on exit."""
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield
        if proc.poll() is not None:
            raise RuntimeError(f"{cmd[0]} exited early ({proc.returncode}):\n{_tail(log)}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)


def _tail(log: Path, lines: int = 30) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:])


def _produce(
    script: Path, count: int, cwd: str, env: dict[str, str], logs: list[Path]
) -> tuple[float, Spent]:
    """Run the producer; its last line is the measured rate (jobs/s) and the
    machine's CPU over the same window (ms a job, busy share)."""
    try:
        out = subprocess.run(
            [sys.executable, str(script), str(count)],
            check=True,
            capture_output=True,
            text=True,
            cwd=cwd,
            env=env,
            timeout=TIMEOUT + 120,
        )
    except subprocess.CalledProcessError as exc:
        tails = "\n".join(f"--- {log.name}\n{_tail(log)}" for log in logs)
        raise RuntimeError(f"{script.name} failed:\n{exc.stderr}\n{tails}") from None
    rate, ms_per_job, busy = map(float, out.stdout.strip().splitlines()[-1].split())
    return rate, Spent(ms_per_job, busy)


def _env(tmp: str) -> dict[str, str]:
    """The app module from `tmp`; bench.cpu from this checkout."""
    return {**os.environ, "PYTHONPATH": os.pathsep.join((tmp, str(ROOT)))}


# -- Celery + Redis ----------------------------------------------------------------

CELERY_APP = """
from celery import Celery

redis = "redis://127.0.0.1:{port}"
app = Celery("bench_celery", broker=redis + "/0", backend=redis + "/1")
app.conf.worker_prefetch_multiplier = 4  # Celery's default, spelled out
app.conf.broker_connection_retry_on_startup = True


@app.task(name="noop")
def noop():
    return None
"""

CELERY_PRODUCER = """
import sys
import time

from celery.result import ResultSet

from bench import cpu
from bench_celery import noop

count = int(sys.argv[1])
ResultSet([noop.delay() for _ in range({workers})]).join_native(timeout=120)  # warm-up
before, start = cpu.sample(), time.perf_counter()
results = ResultSet([noop.delay() for _ in range(count)])
results.join_native(timeout={timeout})  # every task's result is in the backend
rate, used = count / (time.perf_counter() - start), cpu.spent(before, cpu.sample(), count)
print(rate, used.ms_per_item, used.busy)
"""


def celery(options: Options, results: Results, count: int, name: str) -> None:
    """One Celery run on the Redis configuration `name` stands for."""
    _pip("celery[redis]>=5,<6")
    _apt("redis-server", "redis-server")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="bench-celery-") as tmp:
        env = _env(tmp)
        Path(tmp, "bench_celery.py").write_text(CELERY_APP.format(port=port))
        producer = Path(tmp, "produce.py")
        producer.write_text(CELERY_PRODUCER.format(workers=WORKERS, timeout=TIMEOUT))
        redis_log, worker_log = Path(tmp, "redis.log"), Path(tmp, "worker.log")
        redis = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", tmp]
        redis += REDIS_SETTINGS[name]
        # No --concurrency: Celery's default, one worker process per core.
        worker = [sys.executable, "-m", "celery", "-A", "bench_celery", "worker"]
        worker += ["--pool", "prefork", "--loglevel", "warning"]
        worker += ["--without-gossip", "--without-mingle", "--without-heartbeat"]
        with _process(redis, redis_log, tmp, env):
            _wait_port(port)
            with _process(worker, worker_log, tmp, env):
                rate, used = _produce(producer, count, tmp, env, [worker_log, redis_log])
    redis_kind = "AOF, appendfsync always" if REDIS_SETTINGS[name] else "Redis defaults, no AOF"
    results.add(
        "peers",
        name,
        rate,
        "jobs/s",
        f"{count} tasks, prefork {CELERY_PROCESSES} (one per core, Celery's default), "
        f"results in Redis, {redis_kind}",
        used,
    )


# -- procrastinate + PostgreSQL ------------------------------------------------------

PROCRASTINATE_APP = """
import procrastinate

# A pool with a connection per concurrent job, plus the worker's LISTEN and a spare.
app = procrastinate.App(
    connector=procrastinate.PsycopgConnector(
        conninfo="{url}", min_size={pool}, max_size={pool}
    )
)


@app.task(name="noop")
async def noop():
    return None
"""

PROCRASTINATE_PRODUCER = """
import asyncio
import sys
import time

from bench import cpu
from bench_procrastinate import app, noop

DONE = "SELECT count(*) FILTER (WHERE status = 'succeeded') AS ok, "
DONE += "count(*) FILTER (WHERE status IN ('failed', 'aborted')) AS bad FROM procrastinate_jobs"


async def until_done(count, timeout):
    deadline = time.perf_counter() + timeout
    while True:
        row = await app.connector.execute_query_one_async(DONE)
        if row["bad"]:
            raise RuntimeError(f"{{row['bad']}} jobs failed")
        if row["ok"] >= count:
            return
        if time.perf_counter() > deadline:
            raise TimeoutError(f"only {{row['ok']}} of {{count}} jobs done")
        await asyncio.sleep(0.005)


async def main(count):
    async with app.open_async():
        await asyncio.gather(*(noop.defer_async() for _ in range({workers})))  # warm-up
        await until_done({workers}, 120)
        before, start = cpu.sample(), time.perf_counter()
        left = count

        async def queuer():
            nonlocal left
            while left > 0:
                left -= 1
                await noop.defer_async()

        await asyncio.gather(*(queuer() for _ in range({inflight})))
        await until_done({workers} + count, {timeout})
        rate = count / (time.perf_counter() - start)
        used = cpu.spent(before, cpu.sample(), count)
        print(rate, used.ms_per_item, used.busy)


asyncio.run(main(int(sys.argv[1])))
"""


@contextmanager
def throwaway_postgres(options: Options) -> Iterator[str]:
    """A throwaway PostgreSQL cluster (scripts/pg-throwaway); its URL."""
    with tempfile.TemporaryDirectory(prefix="bench-pg-", dir="/tmp") as tmp:
        os.chmod(tmp, 0o755)  # run as root, the cluster runs as `postgres`: let it in
        pgdir = tmp + "/pg"
        started = subprocess.run(
            ["bash", str(PG_THROWAWAY), "start", pgdir], capture_output=True, text=True
        )
        if started.returncode:
            raise RuntimeError(f"pg-throwaway start failed:\n{started.stderr}")
        url = started.stdout.strip()
        try:
            # pg-throwaway runs without fsync (a test cluster); follow the bench's option.
            setting = "on" if options.fsync else "off"
            with psycopg.connect(url, autocommit=True) as conn:
                for name in ("fsync", "synchronous_commit", "full_page_writes"):
                    query = sql.SQL("ALTER SYSTEM SET {} = {}")
                    conn.execute(query.format(sql.Identifier(name), sql.Literal(setting)))
                conn.execute("SELECT pg_reload_conf()")
            time.sleep(0.5)  # the postmaster reloads asynchronously
            with psycopg.connect(url) as conn:
                row = conn.execute("SHOW fsync").fetchone()
                if row is None or row[0] != setting:
                    raise RuntimeError(f"PostgreSQL fsync is {row}, not {setting}")
            yield url
        finally:
            subprocess.run(
                ["bash", str(PG_THROWAWAY), "stop", pgdir], check=False, capture_output=True
            )


def procrastinate(options: Options, results: Results, count: int) -> None:
    _pip("procrastinate>=3,<4")
    with (
        throwaway_postgres(options) as url,
        tempfile.TemporaryDirectory(prefix="bench-proc-") as tmp,
    ):
        env = _env(tmp)
        Path(tmp, "bench_procrastinate.py").write_text(
            PROCRASTINATE_APP.format(url=url, pool=WORKERS + 2)
        )
        producer = Path(tmp, "produce.py")
        producer.write_text(
            PROCRASTINATE_PRODUCER.format(workers=WORKERS, inflight=INFLIGHT, timeout=TIMEOUT)
        )
        cli = [sys.executable, "-m", "procrastinate", "--app", "bench_procrastinate.app"]
        applied = subprocess.run(
            [*cli, "schema", "--apply"], cwd=tmp, env=env, capture_output=True, text=True
        )
        if applied.returncode:
            raise RuntimeError(f"procrastinate schema --apply failed:\n{applied.stderr}")
        worker_log = Path(tmp, "worker.log")
        worker = [*cli, "worker", "--concurrency", str(WORKERS)]
        with _process(worker, worker_log, tmp, env):
            rate, used = _produce(producer, count, tmp, env, [worker_log])
    durability = "fsync on" if options.fsync else "fsync off"
    results.add(
        "peers",
        "procrastinate + PostgreSQL, noop jobs/s",
        rate,
        "jobs/s",
        f"{count} jobs, concurrency {WORKERS}, PostgreSQL 15 {durability}",
        used,
    )


def run(options: Options, results: Results) -> None:
    count = options.scale(5000, 1000)
    celery(options, results, count, CELERY_DEFAULTS)
    celery(options, results, count, CELERY_FSYNC)
    procrastinate(options, results, count)
