"""The rules of the job state machine, as pure functions and constants.

QUEUED -> WAITING (assigned, not yet acked) -> RUNNING -> SUCCESS | ERROR.
WAITING goes back to QUEUED when the runner nacks, disconnects or lets the
ack timeout pass. QUEUED and WAITING jobs end as ERROR when cancelled or
expired; RUNNING ones when force-cancelled or silent past the heartbeat
timeout. The store applies these rules inside its transactions.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from google.rpc import code_pb2, status_pb2

from waystation.protocol import vagrant_server_pb2 as vs

State = vs.Job.State
QUEUED = vs.Job.QUEUED
WAITING = vs.Job.WAITING
RUNNING = vs.Job.RUNNING
ERROR = vs.Job.ERROR
SUCCESS = vs.Job.SUCCESS

ACTIVE = (QUEUED, WAITING, RUNNING)
HELD = (WAITING, RUNNING)  # a runner has it
FINAL = (ERROR, SUCCESS)

OPERATIONS = ("noop", "auth", "docs", "validate", "command", "init")

# Operations that act on a machine: at most one per scope at a time, so two
# commands never act on the same machine at once. Change this rule here.
SERIALIZED_OPERATIONS = frozenset({"command"})


def serialization_key(
    operation: str, basis_id: str | None, project_id: str | None, target_id: str | None
) -> str | None:
    """The scope a job holds while assigned or running; None if it never blocks."""
    if operation not in SERIALIZED_OPERATIONS:
        return None
    if target_id:
        return f"target:{target_id}"
    if project_id:
        return f"project:{project_id}"
    if basis_id:
        return f"basis:{basis_id}"
    return None


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


def cancelled_status() -> status_pb2.Status:
    # Upstream's exact error for cancelled and heartbeat-timed-out jobs.
    return status_pb2.Status(code=code_pb2.CANCELLED, message="canceled")


def can_complete(state: int) -> bool:
    return state == RUNNING


def state_name(state: int) -> str:
    return vs.Job.State.Name(state)  # type: ignore[arg-type]
