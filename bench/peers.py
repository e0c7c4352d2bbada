"""The same noop workload through Celery 5 (Redis broker) and procrastinate (PostgreSQL).

Same job count and worker count as `jobs` with 10 runner streams. The scenario
installs what it needs (pip: celery, redis, procrastinate; Debian: redis-server
and PostgreSQL) and starts throwaway servers on loopback.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from bench.common import Options, Results

ROOT = Path(__file__).resolve().parent.parent
WORKERS = 10


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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float = 30) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise TimeoutError(f"nothing listens on {port}")


CELERY_APP = """
from celery import Celery
app = Celery("bench", broker="redis://127.0.0.1:{port}/0", backend="redis://127.0.0.1:{port}/1")
app.conf.worker_prefetch_multiplier = 4
@app.task
def noop():
    return None
"""

CELERY_PRODUCER = """
import sys, time
sys.path.insert(0, sys.argv[1])
from bench_celery import noop
n = int(sys.argv[2])
start = time.perf_counter()
results = [noop.delay() for _ in range(n)]
for r in results:
    r.get(timeout=600)
print(n / (time.perf_counter() - start))
"""


def celery(options: Options, results: Results, count: int) -> None:
    _pip("celery[redis]>=5,<6")
    _apt("redis-server", "redis-server")
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="bench-celery-") as tmp:
        redis = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
        )
        try:
            _wait_port(port)
            Path(tmp, "bench_celery.py").write_text(CELERY_APP.format(port=port))
            worker = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "celery",
                    "-A",
                    "bench_celery",
                    "worker",
                    "--concurrency",
                    str(WORKERS),
                    "--loglevel",
                    "warning",
                    "--without-gossip",
                    "--without-mingle",
                    "--without-heartbeat",
                ],
                cwd=tmp,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
            try:
                time.sleep(5)  # the prefork pool starts its processes
                out = subprocess.run(
                    [sys.executable, "-c", CELERY_PRODUCER, tmp, str(count)],
                    check=True,
                    capture_output=True,
                    text=True,
                    cwd=tmp,
                )
                rate = float(out.stdout.strip().splitlines()[-1])
            finally:
                worker.terminate()
                worker.wait(30)
        finally:
            redis.terminate()
            redis.wait(10)
    results.add(
        "peers",
        "Celery 5 + Redis, noop tasks/s",
        rate,
        "jobs/s",
        f"{count} tasks, prefork {WORKERS}, results in Redis",
    )


PROCRASTINATE_APP = """
import procrastinate
app = procrastinate.App(connector=procrastinate.PsycopgConnector(conninfo="{url}"))
@app.task(name="noop")
async def noop():
    return None
"""

PROCRASTINATE_RUN = """
import asyncio, sys, time
sys.path.insert(0, sys.argv[1])
from bench_procrastinate import app, noop
n = int(sys.argv[2]); workers = int(sys.argv[3])
async def main():
    async with app.open_async():
        start = time.perf_counter()
        await noop.batch_defer_async(*([{{}}] * n))
        await app.run_worker_async(concurrency=workers, wait=False, install_signal_handlers=False)
        print(n / (time.perf_counter() - start))
asyncio.run(main())
"""


def procrastinate(options: Options, results: Results, count: int) -> None:
    _pip("procrastinate>=3,<4")
    with tempfile.TemporaryDirectory(prefix="bench-pg-", dir="/tmp") as pgdir:
        url = options.db
        started = not url
        if started:
            url = subprocess.run(
                ["bash", str(ROOT / "scripts" / "pg-throwaway"), "start", pgdir + "/pg"],
                check=True,
                capture_output=True,
                text=True,
            ).stdout.strip()
        try:
            with tempfile.TemporaryDirectory(prefix="bench-proc-") as tmp:
                Path(tmp, "bench_procrastinate.py").write_text(PROCRASTINATE_APP.format(url=url))
                env = {**os.environ, "PYTHONPATH": tmp}
                subprocess.run(
                    [
                        sys.executable,
                        "-m",
                        "procrastinate",
                        "--app",
                        "bench_procrastinate.app",
                        "schema",
                        "--apply",
                    ],
                    check=True,
                    cwd=tmp,
                    env=env,
                    capture_output=True,
                )
                out = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        textwrap.dedent(PROCRASTINATE_RUN),
                        tmp,
                        str(count),
                        str(WORKERS),
                    ],
                    check=True,
                    capture_output=True,
                    text=True,
                    cwd=tmp,
                    env=env,
                )
                rate = float(out.stdout.strip().splitlines()[-1])
        finally:
            if started:
                subprocess.run(
                    ["bash", str(ROOT / "scripts" / "pg-throwaway"), "stop", pgdir + "/pg"],
                    check=False,
                    capture_output=True,
                )
    results.add(
        "peers",
        "procrastinate + PostgreSQL, noop jobs/s",
        rate,
        "jobs/s",
        f"{count} jobs, concurrency {WORKERS}",
    )


def run(options: Options, results: Results) -> None:
    count = options.scale(5000, 1000)
    celery(options, results, count)
    procrastinate(options, results, count)
