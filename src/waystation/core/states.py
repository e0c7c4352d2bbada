"""Jobs as both protocols share them: states, kinds, operations and scopes.

QUEUED -> WAITING (assigned, not yet acked) -> RUNNING -> SUCCESS | ERROR.
WAITING goes back to QUEUED when the runner nacks, disconnects or lets the
ack timeout pass. QUEUED and WAITING jobs end as ERROR when cancelled or
expired; RUNNING ones when force-cancelled or silent past the heartbeat
timeout. The store applies these rules inside its transactions; the engine
drives them.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum

from google.rpc import code_pb2, status_pb2


class JobState(IntEnum):
    """A job's state, for jobs of every kind: the values stored in jobs.state.

    They equal vagrant_server's Job.State numbers (so no stored state changed
    when this enum came); the front ends translate, the store and engine use
    only this.
    """

    QUEUED = 1
    WAITING = 2  # assigned to a runner, not yet acked (provisioner jobs skip it)
    RUNNING = 3
    ERROR = 4
    SUCCESS = 5


class JobKind(StrEnum):
    """jobs.kind: which workers take the job; the kind decides only the payload."""

    VAGRANT = "vagrant"  # runners, over hashicorp.vagrant.Vagrant
    PROVISIONER = "provisioner"  # provisioner daemons, over provisionerd


class Ending(StrEnum):
    """How a job ended: every ending goes through the store's one finish path."""

    COMPLETED = "completed"  # its holder reported success
    FAILED = "failed"  # its holder reported an error (or its payload was too big)
    CANCELLED = "cancelled"  # cancelled while queued, or cancelled twice
    EXPIRED = "expired"  # not acked before expires_in
    TIMED_OUT = "timed out"  # a runner's heartbeats stopped
    HUNG = "hung"  # a provisioner daemon's updates stopped
    BROKEN = "broken"  # the daemon's call went away before the job reached it


QUEUED = JobState.QUEUED
WAITING = JobState.WAITING
RUNNING = JobState.RUNNING
ERROR = JobState.ERROR
SUCCESS = JobState.SUCCESS

ACTIVE = (QUEUED, WAITING, RUNNING)
HELD = (WAITING, RUNNING)  # a runner has it
FINAL = (ERROR, SUCCESS)

VAGRANT = JobKind.VAGRANT
PROVISIONER = JobKind.PROVISIONER

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


def cancelled_status() -> status_pb2.Status:
    # Upstream's exact error for cancelled and heartbeat-timed-out jobs.
    return status_pb2.Status(code=code_pb2.CANCELLED, message="canceled")


def state_name(state: int) -> str:
    return JobState(state).name
