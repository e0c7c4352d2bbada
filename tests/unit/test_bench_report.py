"""The benchmark's CPU accounting and its table (the figures themselves are bench/'s)."""

from __future__ import annotations

import pytest

from bench import cpu
from bench.__main__ import report
from bench.common import Options, Results
from bench.profile import by_library


def test_spent_is_busy_cpu_per_item_and_busy_share() -> None:
    before = cpu.Sample(busy=10.0, idle=50.0)
    after = cpu.Sample(busy=13.0, idle=51.0)  # 3 s busy of 4 s of core time
    used = cpu.spent(before, after, items=1000)
    assert used.ms_per_item == 3.0
    assert used.busy == 0.75


def test_sample_reads_this_machine() -> None:
    first = cpu.sample()
    sum(range(200_000))
    second = cpu.sample()
    assert 0 < first.busy <= second.busy
    assert 0 < first.idle <= second.idle


def test_report_shows_cpu_only_where_measured() -> None:
    results = Results()
    results.add("ceiling", "unary echo, 64 in flight", 2000.0, "calls/s")
    results.add(
        "jobs", "noop jobs/s, 10 runner streams", 300.0, "jobs/s", "", cpu.Spent(4.96, 0.82)
    )
    rows = {
        line.split(" | ")[1]: line
        for line in report(results, Options(False, "")).splitlines()
        if line.startswith("| ceiling") or line.startswith("| jobs")
    }
    assert "| 4.96 ms | 82% |" in rows["noop jobs/s, 10 runner streams"]
    assert "| 0.15x |" in rows["noop jobs/s, 10 runner streams"]  # against the ceiling
    assert "ms |" not in rows["unary echo, 64 in flight"].split("calls/s")[1]


def test_by_library_splits_the_event_count_by_share() -> None:
    report = """# Samples: 8K of event 'cpu-clock:ppp'
# Event count (approx.): 4000000000
#
# Overhead  Shared Object
# ........  ....................
#
    50.00%  libpython3.11.so.1.0
    25.00%  [kernel.kallsyms]
    25.00%  cygrpc.cpython-311-x86_64-linux-gnu.so
"""
    assert by_library(report) == {
        "libpython3.11.so.1.0": 2000.0,
        "[kernel.kallsyms]": 1000.0,
        "cygrpc.cpython-311-x86_64-linux-gnu.so": 1000.0,
    }


def test_by_library_refuses_a_report_without_an_event_count() -> None:
    with pytest.raises(ValueError, match="no event count"):
        by_library("    50.00%  libpython3.11.so.1.0\n")
