"""The benchmark's CPU accounting and its table (the figures themselves are bench/'s)."""

from __future__ import annotations

import pytest

from bench import cpu, peers, replicas
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


def _rows(table: str, first_cell: str) -> list[list[str]]:
    """The cells of the table rows whose first cell is `first_cell`."""
    found = []
    for line in table.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            found.append(cells)
    return found


def test_report_compares_jobs_with_both_celery_configurations() -> None:
    results = Results()
    results.add("jobs", "noop jobs/s, 10 runner streams", 300.0, "jobs/s")
    results.add("peers", peers.CELERY_DEFAULTS, 600.0, "jobs/s", "prefork 2, Redis defaults")
    results.add("peers", peers.CELERY_FSYNC, 250.0, "jobs/s", "prefork 2, appendfsync always")
    table = report(results, Options(False, ""))
    header = next(line for line in table.splitlines() if line.startswith("| scenario"))
    columns = [c.strip() for c in header.strip("|").split("|")]
    (jobs,) = _rows(table, "jobs")
    assert jobs[columns.index("vs Celery, Redis defaults")] == "0.50x"
    assert jobs[columns.index("vs Celery, appendfsync always")] == "1.20x"
    names = [row[1] for row in _rows(table, "peers")]
    assert names == [peers.CELERY_DEFAULTS, peers.CELERY_FSYNC]
    assert "no AOF" in names[0] and "appendfsync always" in names[1]


def test_report_renders_replicas_in_a_table_of_their_own() -> None:
    results = Results()
    results.add("jobs", "noop jobs/s, 10 runner streams", 300.0, "jobs/s")
    for count, rate in ((1, 200.0), (2, 300.0), (3, 350.0)):
        results.add(
            "replicas", replicas.throughput_name(count), rate, "jobs/s", "", cpu.Spent(7.5, 0.9)
        )
    results.add("replicas", replicas.ASSIGN_P99, 1500.0, "ms")
    results.add("replicas", replicas.LAG_OTHER_P99, 80.0, "ms")
    results.add("replicas", replicas.LAG_SAME_P99, 5.0, "ms")
    table = report(results, Options(False, ""))
    main, _, own = table.partition("### Replicas on one PostgreSQL")
    assert own, "no replicas table"
    own = own.split("\n## ")[0]  # bench/NOTES.md follows, with tables of its own
    assert not _rows(main, "replicas")  # not in the main table
    by_name = {row[0]: row for row in _rows(own, replicas.throughput_name(2))}
    two = by_name[replicas.throughput_name(2)]
    assert two[1:4] == ["300.0", "jobs/s", "1.50x"]  # against one replica
    assert "7.50 ms" in two and "90%" in two
    (assign,) = _rows(own, replicas.ASSIGN_P99)
    assert assign[1] == "1,500.0" and "< 20 ms" in assign and "missed" in assign
    (lag,) = _rows(own, replicas.LAG_OTHER_P99)
    assert "< 100 ms" in lag and "met" in lag
    (same,) = _rows(own, replicas.LAG_SAME_P99)
    assert "met" not in same and "missed" not in same  # no target: no verdict


def test_report_has_no_replicas_table_without_replicas_figures() -> None:
    results = Results()
    results.add("jobs", "noop jobs/s, 10 runner streams", 300.0, "jobs/s")
    assert "### Replicas on one PostgreSQL (`replicas`)" not in report(results, Options(False, ""))


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
