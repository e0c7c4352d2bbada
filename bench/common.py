"""What every scenario shares: servers and clients in their own processes, figures."""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import platform
import socket
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.cpu import Spent
from waystation.testing import ServerProcess

# Clients run in processes of their own, like real deployments.
CTX = multiprocessing.get_context("spawn")


@dataclass
class Options:
    quick: bool
    db: str  # "" for SQLite in a temp dir
    fsync: bool = True

    def scale(self, full: int, quick: int) -> int:
        return quick if self.quick else full


@dataclass
class Figure:
    scenario: str
    name: str
    value: float
    unit: str
    note: str = ""
    cpu: Spent | None = None  # the machine's CPU over the measured window


@dataclass
class Results:
    figures: list[Figure] = field(default_factory=list)

    def add(
        self,
        scenario: str,
        name: str,
        value: float,
        unit: str,
        note: str = "",
        cpu: Spent | None = None,
    ) -> Figure:
        figure = Figure(scenario, name, value, unit, note, cpu)
        self.figures.append(figure)
        used = f" [{cpu.ms_per_item:.2f} ms CPU each, {cpu.busy:.0%} busy]" if cpu else ""
        print(f"  {scenario:9} {name:44} {value:>12,.1f} {unit} {note}{used}", flush=True)
        return figure

    def get(self, scenario: str, name: str) -> float | None:
        for f in self.figures:
            if f.scenario == scenario and f.name == name:
                return f.value
        return None


@contextmanager
def waystation_server(options: Options, *args: str) -> Iterator[ServerProcess]:
    """A real `waystation server run` process on a fresh database."""
    with tempfile.TemporaryDirectory(prefix="ws-bench-") as tmp:
        flags = [] if options.fsync else ["--no-fsync"]
        server = ServerProcess(Path(tmp) / "data", options.db, *flags, *args)
        server.start()
        try:
            yield server
        finally:
            server.stop()


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[k]


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def run_async_in_process(fn: Callable[..., Any], *args: Any) -> Any:
    """Target for CTX.Process/Pool: run `fn(*args)` (a coroutine function) to completion."""
    return asyncio.run(fn(*args))


def processes(target: Callable[..., Any], arg_lists: list[tuple[Any, ...]]) -> list[Any]:
    """Run `target(*args)` (async) in one process per arg list; return their results."""
    with CTX.Pool(len(arg_lists)) as pool:
        pending = [pool.apply_async(run_async_in_process, (target, *a)) for a in arg_lists]
        return [p.get(timeout=1800) for p in pending]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def machine() -> dict[str, str]:
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    return {
        "cores": str(os.cpu_count()),
        "memory": f"{int(mem) / 1024 / 1024:.0f} GiB",
        "python": platform.python_version(),
        "platform": platform.platform(terse=True),
    }


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start
