"""What the whole machine spends on a measured run, from /proc/stat.

Every process on the machine counts (server, clients, workers, brokers):
each system's CPU a job, measured the same way, says why its rate is what it
is. Steal (time the hypervisor gave to other guests) is neither busy nor idle.
No imports beyond the standard library: the peers' producers use it too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TICK = 1 / os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Sample:
    busy: float  # CPU seconds over all cores: user, nice, system, irq, softirq
    idle: float  # idle and iowait


@dataclass(frozen=True)
class Spent:
    ms_per_item: float  # busy CPU milliseconds for each item of work
    busy: float  # the share of the machine's cores that was busy, 0..1


def sample() -> Sample:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    user, nice, system, idle, iowait, irq, softirq, _steal = fields
    return Sample((user + nice + system + irq + softirq) * TICK, (idle + iowait) * TICK)


def spent(before: Sample, after: Sample, items: int) -> Spent:
    busy = after.busy - before.busy
    total = busy + after.idle - before.idle
    return Spent(busy * 1000 / max(items, 1), busy / total if total else 0.0)
