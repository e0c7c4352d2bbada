"""Every timeout of the engine, and the clock the store keeps time in."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Timeouts:
    """Every timeout of the engine, in seconds; tests shrink them."""

    ack: float = 120.0  # WAITING this long without an ack: back to QUEUED
    heartbeat: float = 120.0  # RUNNING this long without a heartbeat: ERROR
    runner_heartbeat: float = 15.0  # how often runners are expected to heartbeat
    runner_lease: float = 60.0  # a runner is online while its lease is fresh
    poll: float = 2.0  # how often to look for work other replicas changed
    prune_interval: float = 600.0  # background prune period
    prune_keep: int = 10_000  # completed jobs the background prune keeps
    prune_rpc_keep: int = 50  # completed jobs PruneOldJobs keeps
    provisioner_hang: float = 300.0  # a provisioner job this long without an update: failed
    acquire_long_poll: float = 5.0  # how long the deprecated AcquireJob waits for a job


def now_us() -> int:
    """Time in the store: integer microseconds since the epoch."""
    return time.time_ns() // 1000


def to_us(seconds: float) -> int:
    return int(seconds * 1_000_000)
