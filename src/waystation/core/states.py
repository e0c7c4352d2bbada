"""Jobs as both protocols share them: states, kinds, operations and scopes.

QUEUED -> WAITING (assigned, not yet acked) -> RUNNING -> SUCCESS | ERROR.
WAITING goes back to QUEUED when the runner nacks, disconnects or lets the
ack timeout pass. QUEUED and WAITING jobs end as ERROR when cancelled or
expired; RUNNING ones when force-cancelled or silent past the heartbeat
timeout. The store applies these rules inside its transactions; the engine
drives them.
"""

from __future__ import annotations

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

# jobs.kind: which protocol's workers take the job. One table, one set of
# states; the kind decides only the payload and who may acquire it.
VAGRANT = "vagrant"  # runners, over hashicorp.vagrant.Vagrant
PROVISIONER = "provisioner"  # provisioner daemons, over provisionerd

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
    return vs.Job.State.Name(state)  # type: ignore[arg-type]
