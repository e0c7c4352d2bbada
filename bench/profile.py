"""`python -m bench.profile [--streams N] [--jobs N] [--libraries]`: where the server CPU goes.

The `jobs` workload (10 runner streams by default) against a fresh server,
with py-spy (installed on first use, as the peers' packages are) sampling
every thread of the server process. Written to bench/profiles/: per thread,
its busy share, what its samples were spent on by kind, and the functions
with the most samples, own and inclusive. The throughput printed is under
sampling, a little below the unprofiled figure.

With --libraries, perf (linux-perf, installed on first use) samples the
whole server process instead, on our server and on the protocol floor (the
in-memory server of the `ceiling` scenario) under the same workload: the
server's CPU a job, by library (the interpreter, gRPC's core, SQLite, the
kernel...), side by side. That is what the floor does not pay.

py-spy sees Python frames only: time in C called from a loop callback (the
Cython of grpc.aio, asyncio's C tasks and futures) shows as the callback
runner's own time, `Handle._run`. A thread blocked in fsync counts as busy.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

from bench import ceiling, jobs
from bench.common import Options, machine, waystation_server
from bench.peers import _apt, _pip

PROFILES = Path(__file__).parent / "profiles"
RATE = 200  # samples a second per thread
PERF_HZ = 999  # perf's samples a second (an odd rate, so as not to beat with timers)
TOP = 25
# A leaf frame's file, first match wins: what a sample was spent on.
KINDS = [
    ("asyncio/events.py", "C called from loop callbacks (grpc.aio's Cython, asyncio's C tasks)"),
    ("selectors.py", "waiting in epoll"),
    ("waystation/store/", "waystation storage (statements on the driver, batches)"),
    ("sqlalchemy/", "SQLAlchemy (connections, transactions; the commit's fsync)"),
    ("waystation/", "waystation servicers and engine"),
    ("grpc/", "grpc Python layer"),
    ("google/protobuf/", "protobuf Python layer"),
    ("asyncio/", "asyncio Python layer"),
    ("concurrent/", "executor threads (waiting for work, handing results back)"),
    ("threading.py", "threads waiting"),
]


def _py_spy() -> str:
    found = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(found).exists():
        _pip("py-spy")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    parser.add_argument("--streams", type=int, default=10)
    parser.add_argument("--jobs", type=int, default=3000)
    parser.add_argument("--libraries", action="store_true", help="perf, ours against the floor")
    args = parser.parse_args()
    if args.libraries:
        return libraries(args.streams, args.jobs)
    spy = _py_spy()
    with tempfile.TemporaryDirectory() as tmp, waystation_server(Options(False, "")) as server:
        assert server.proc is not None
        raw = Path(tmp) / "raw.txt"
        record = ["record", "--format", "raw", "--output", str(raw), "--rate", str(RATE)]
        sampler = subprocess.Popen(
            [spy, *record, "--pid", str(server.proc.pid), "--threads", "--nonblocking"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(1.0)  # py-spy attaches
        started = time.perf_counter()
        rate, used = jobs.jobs_per_second(server.address, args.streams, args.jobs)
        seconds = time.perf_counter() - started
        sampler.send_signal(signal.SIGINT)
        sampler.wait(60)
        stacks = _read(raw)
    info = machine()
    header = [
        f"# Server profile: `jobs`, {args.streams} runner streams, {args.jobs} noop jobs",
        "",
        f"`{' '.join(['python -m bench.profile', *sys.argv[1:]])}` on {info['cores']} cores, "
        f"Python {info['python']}, SQLite with fsync. Under sampling: {rate:,.0f} jobs/s, "
        f"the machine {used.busy:.0%} busy at {used.ms_per_item:.2f} ms of CPU a job.",
        f"py-spy at {RATE} Hz for {seconds:.1f} s (plus its 1 s start); a thread's busy "
        "share is its samples over the samples it would have had running all the time.",
    ]
    return _write(f"jobs-{args.streams}-streams.md", header + _report(stacks, seconds + 1.0))


def _write(name: str, lines: list[str]) -> int:
    text = "\n".join(lines) + "\n"
    PROFILES.mkdir(exist_ok=True)
    out = PROFILES / name
    out.write_text(text)
    print(text)
    print(f"written to {out}")
    return 0


def libraries(streams: int, count: int) -> int:
    _apt("perf", "linux-perf")
    with waystation_server(Options(False, "")) as server:
        assert server.proc is not None
        ours = _perf_run(server.address, server.proc.pid, streams, count)
    with ceiling.floor_server() as (address, pid):
        floor = _perf_run(address, pid, streams, count)
    info = machine()
    lines = [
        f"# Server CPU a job by library: `jobs`, {streams} runner streams, {count} noop jobs",
        "",
        f"`{' '.join(['python -m bench.profile', *sys.argv[1:]])}` on {info['cores']} cores, "
        f"Python {info['python']}, SQLite with fsync. perf samples the server process at "
        f"{PERF_HZ} Hz over the whole run: waystation {ours.rate:,.0f} jobs/s, the protocol "
        f"floor (in memory, no storage) {floor.rate:,.0f} jobs/s under sampling.",
        "",
        "| library | waystation, ms a job | floor, ms a job | difference |",
        "|---|---:|---:|---:|",
    ]
    names = sorted(set(ours.ms) | set(floor.ms), key=lambda n: -ours.ms.get(n, 0.0))
    for name in [n for n in names if max(ours.ms.get(n, 0), floor.ms.get(n, 0)) >= 0.005]:
        a, b = ours.ms.get(name, 0.0), floor.ms.get(name, 0.0)
        lines.append(f"| {name} | {a:.3f} | {b:.3f} | {a - b:+.3f} |")
    a, b = sum(ours.ms.values()), sum(floor.ms.values())
    lines.append(f"| **server process** | **{a:.3f}** | **{b:.3f}** | **{a - b:+.3f}** |")
    return _write(f"jobs-{streams}-streams-libraries.md", lines)


@dataclass
class _PerfRun:
    rate: float  # jobs/s under sampling
    ms: dict[str, float]  # server CPU ms a job, by library


def _perf_run(address: str, pid: int, streams: int, count: int) -> _PerfRun:
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "perf.data"
        # cpu-clock, whose event count is in nanoseconds (the default may be cycles).
        record = ["perf", "record", "-e", "cpu-clock", "-F", str(PERF_HZ), "-p", str(pid)]
        record += ["-o", str(data)]
        sampler = subprocess.Popen(record, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(1.0)  # perf attaches
        rate, _ = jobs.jobs_per_second(address, streams, count)
        sampler.send_signal(signal.SIGINT)
        sampler.wait(60)
        report = subprocess.run(
            ["perf", "report", "-i", str(data), "--no-children", "--sort", "dso", "--stdio"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    return _PerfRun(rate, {name: ms / count for name, ms in by_library(report).items()})


def by_library(report: str) -> dict[str, float]:
    """CPU milliseconds by library from `perf report --sort dso --stdio` of a
    cpu-clock recording (its event count is in nanoseconds)."""
    total = re.search(r"^# Event count \(approx\.\): (\d+)", report, re.M)
    if total is None:
        raise ValueError("no event count in the perf report")
    ms = int(total.group(1)) / 1e6
    shares = re.findall(r"^\s+([\d.]+)%\s+(\S+)\s*$", report, re.M)
    return {name: float(share) / 100 * ms for share, name in shares}


def _read(raw: Path) -> dict[str, Counter[tuple[str, ...]]]:
    """Samples per thread name, per stack (root first, line numbers dropped)."""
    threads: dict[str, Counter[tuple[str, ...]]] = defaultdict(Counter)
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        thread, *frames = stack.split(";")
        name = re.sub(r"^thread \(\d+\): ", "", thread)
        threads[name][tuple(re.sub(r":\d+\)$", ")", f) for f in frames)] += int(count)
    return threads


def _report(threads: dict[str, Counter[tuple[str, ...]]], seconds: float) -> list[str]:
    lines: list[str] = []
    by_size = sorted(threads.items(), key=lambda kv: -sum(kv[1].values()))
    for name, stacks in by_size:
        total = sum(stacks.values())
        lines += ["", f"## {name}: {total:,} samples, {total / (RATE * seconds):.0%} busy", ""]
        kinds: Counter[str] = Counter()
        own: Counter[str] = Counter()
        inclusive: Counter[str] = Counter()
        for frames, count in stacks.items():
            leaf = frames[-1] if frames else name
            kinds[_kind(leaf)] += count
            own[leaf] += count
            for frame in set(frames):
                inclusive[frame] += count
        lines += ["| spent on | share |", "|---|---:|"]
        lines += [f"| {kind} | {n / total:.1%} |" for kind, n in kinds.most_common()]
        lines += ["", "Own time:", "```"]
        lines += [f"{n / total:6.1%}  {f}" for f, n in own.most_common(TOP)]
        lines += ["```", "", "Inclusive (without the frames in most samples: entry, loop):", "```"]
        # Frames in most samples (the thread's entry, run_forever) say nothing.
        lines += [
            f"{n / total:6.1%}  {f}"
            for f, n in [kv for kv in inclusive.most_common() if kv[1] < 0.75 * total][:TOP]
        ]
        lines.append("```")
    return lines


def _kind(frame: str) -> str:
    for marker, kind in KINDS:
        if marker in frame:
            return kind
    return "other"


if __name__ == "__main__":
    raise SystemExit(main())
