"""`python -m bench [SCENARIO ...] [--quick] [--db URL]`: measure, print, record.

Every scenario named runs in this one invocation so that ratios between them
hold on a noisy machine. Results go to stdout as a Markdown table and to
bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import datetime
import sys
from collections.abc import Callable
from pathlib import Path

from bench import ceiling, fanout, idle, jobs, peers, provision, replicas
from bench.common import Options, Results, machine

SCENARIOS: dict[str, Callable[[Options, Results], None]] = {
    "ceiling": ceiling.run,
    "jobs": jobs.run,
    "provision": provision.run,
    "idle": idle.run,
    "fanout": fanout.run,
    "peers": peers.run,
    "replicas": replicas.run,
}
RESULTS = Path(__file__).parent / "RESULTS.md"


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("scenarios", nargs="*", choices=[*SCENARIOS, "all"], default=["all"])
    parser.add_argument("--quick", action="store_true", help="a run of about a minute each")
    parser.add_argument("--db", default="", help="postgresql://... (default: SQLite)")
    parser.add_argument("--no-fsync", action="store_true", help="measure without fsync")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    args = parser.parse_args()
    names = list(SCENARIOS) if "all" in args.scenarios else args.scenarios
    options = Options(quick=args.quick, db=args.db, fsync=not args.no_fsync)
    results = Results()
    for name in names:
        print(f"== {name}", flush=True)
        SCENARIOS[name](options, results)
    table = report(results, options)
    print(table)
    if not args.no_write:
        RESULTS.write_text(table)
    return 0


def report(results: Results, options: Options) -> str:
    ceiling_rate = results.get("ceiling", ceiling.UNARY)
    floor = results.get("ceiling", ceiling.FLOOR)
    celery_defaults = results.get("peers", peers.CELERY_DEFAULTS)
    celery_fsync = results.get("peers", peers.CELERY_FSYNC)
    procrastinate = results.get("peers", "procrastinate + PostgreSQL, noop jobs/s")
    info = machine()
    lines = [
        "# Benchmark results",
        "",
        f"Run {datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC with "
        f"`python -m bench {' '.join(sys.argv[1:])}`.",
        f"Machine: {info['cores']} cores, {info['memory']}, Python {info['python']}, "
        f"{info['platform']}. Backend: {'PostgreSQL' if options.db else 'SQLite'}, "
        f"fsync {'on' if options.fsync else 'off'}.",
        "",
        "| scenario | measure | value | unit | vs ceiling | vs protocol floor "
        "| vs Celery, Redis defaults | vs Celery, appendfsync always | vs procrastinate "
        "| machine CPU a job | machine busy | note |",
        "|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for f in results.figures:
        if f.scenario == replicas.SCENARIO:
            continue  # a table of their own, below
        per_second = f.unit.endswith("/s")
        against_ceiling = per_second and (
            f.scenario in ("jobs", "provision") or f.name == ceiling.FLOOR
        )
        lines.append(
            f"| {f.scenario} | {f.name} | {f.value:,.1f} | {f.unit} | "
            f"{_ratio(f.value, ceiling_rate) if against_ceiling else ''} | "
            f"{_ratio(f.value, floor) if per_second and f.scenario == 'jobs' else ''} | "
            f"{_ratio(f.value, celery_defaults) if f.scenario == 'jobs' and per_second else ''} | "
            f"{_ratio(f.value, celery_fsync) if f.scenario == 'jobs' and per_second else ''} | "
            f"{_ratio(f.value, procrastinate) if f.scenario == 'jobs' and per_second else ''} | "
            f"{f'{f.cpu.ms_per_item:.2f} ms' if f.cpu else ''} | "
            f"{f'{f.cpu.busy:.0%}' if f.cpu else ''} | "
            f"{f.note} |"
        )
    lines += replicas_table(results)
    notes = Path(__file__).with_name("NOTES.md")
    if notes.exists():  # what the figures mean, kept by hand beside the generated table
        lines += ["", notes.read_text().strip()]
    return "\n".join(lines) + "\n"


def replicas_table(results: Results) -> list[str]:
    """The `replicas` figures, when measured: replicas on one PostgreSQL, against
    one replica's jobs/s and against the issue's latency targets."""
    figures = [f for f in results.figures if f.scenario == replicas.SCENARIO]
    if not figures:
        return []
    one = results.get(replicas.SCENARIO, replicas.throughput_name(1))
    lines = [
        "",
        "### Replicas on one PostgreSQL (`replicas`)",
        "",
        "| measure | value | unit | vs 1 replica | target | verdict "
        "| machine CPU a job | machine busy | note |",
        "|---|---:|---|---:|---:|---|---:|---:|---|",
    ]
    for f in figures:
        target = replicas.TARGETS_MS.get(f.name)
        per_second = f.unit.endswith("/s")
        lines.append(
            f"| {f.name} | {f.value:,.1f} | {f.unit} | "
            f"{_ratio(f.value, one) if per_second else ''} | "
            f"{f'< {target:g} ms' if target else ''} | "
            f"{('met' if f.value < target else 'missed') if target else ''} | "
            f"{f'{f.cpu.ms_per_item:.2f} ms' if f.cpu else ''} | "
            f"{f'{f.cpu.busy:.0%}' if f.cpu else ''} | "
            f"{f.note} |"
        )
    return lines


def _ratio(value: float, base: float | None) -> str:
    return f"{value / base:.2f}x" if base else ""


if __name__ == "__main__":
    raise SystemExit(main())
