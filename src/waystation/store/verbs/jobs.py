"""Verbs of runner jobs (the Vagrant side), their timers and their output."""

from __future__ import annotations

from google.rpc import status_pb2

from waystation.core.roles import Actor
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store import job_timers as timer_tx
from waystation.store import jobs as job_tx
from waystation.store import output as output_tx
from waystation.store.audit import audited, audited_as
from waystation.store.verbs.base import Pending, Verbs


class JobVerbs(Verbs):
    # -- lifecycle -------------------------------------------------------------

    def job_queue(self, job: vs.Job, now: int, expires_in: int | None) -> Pending[str]:
        """Persist a QUEUED job; its id."""
        return self._db.write(job_tx.job_queue, job, now, expires_in)

    def job_queue_and_hand(
        self,
        job: vs.Job,
        now: int,
        expires_in: int | None,
        runner: job_tx.Runner,
        ack_timeout: int,
    ) -> Pending[tuple[str, vs.Job | None]]:
        """Queue a job and, in the same transaction, assign the oldest fitting job to `runner`."""
        return self._db.write(job_tx.job_queue_and_hand, job, now, expires_in, runner, ack_timeout)

    def job_assignable_exists(self, runner_id: str, by_id_only: bool) -> Pending[bool]:
        """Whether any QUEUED job might go to this runner (a cheap look before assigning)."""
        return self._db.read(job_tx.jobs_assignable_exist, runner_id, by_id_only)

    def job_assign_for_runner(
        self, runner_id: str, by_id_only: bool, now: int, ack_timeout: int
    ) -> Pending[vs.Job | None]:
        """QUEUED -> WAITING for the oldest job fitting this runner, or None."""
        return self._db.write(job_tx.job_assign, runner_id, by_id_only, now, ack_timeout)

    def job_ack(
        self, job_id: str, runner_id: str, assigned_at: int, now: int, heartbeat_timeout: int
    ) -> Pending[vs.Job]:
        """WAITING -> RUNNING, if the job is still this runner's assignment."""
        return self._db.write(
            job_tx.job_ack, job_id, runner_id, assigned_at, now, heartbeat_timeout
        )

    def job_nack(self, job_id: str, runner_id: str, assigned_at: int) -> Pending[bool]:
        """WAITING -> QUEUED again (the runner let it go); whether it was."""
        return self._db.write(job_tx.job_nack, job_id, runner_id, assigned_at)

    def job_heartbeat(
        self, job_id: str, runner_id: str, now: int, heartbeat_timeout: int
    ) -> Pending[bool]:
        """Push a RUNNING job's heartbeat deadline; whether the runner still holds it."""
        return self._db.write(job_tx.job_heartbeat, job_id, runner_id, now, heartbeat_timeout)

    def job_resume(
        self, job_id: str, runner_id: str, now: int, heartbeat_timeout: int
    ) -> Pending[vs.Job]:
        """A runner's new stream carries on with its RUNNING job (FailedPrecondition if not)."""
        return self._db.write(job_tx.job_resume, job_id, runner_id, now, heartbeat_timeout)

    def job_complete(
        self,
        job_id: str,
        runner_id: str,
        now: int,
        result: vs.Job.Result | None,
        error: status_pb2.Status | None,
    ) -> Pending[vs.Job]:
        """RUNNING -> SUCCESS or ERROR, by the runner holding it."""
        return self._db.write(job_tx.job_complete, job_id, runner_id, now, result, error)

    def job_cancel(
        self, job_id: str, now: int, kind: str = job_tx.VAGRANT, actor: Actor | None = None
    ) -> Pending[job_tx.CancelOutcome]:
        """Cancel a job (a second cancel of a running one forces it), audited if it was live."""
        action = "job.cancel" if kind == job_tx.VAGRANT else "provisioner_job.cancel"

        def describe(outcome: job_tx.CancelOutcome) -> tuple[str, str] | None:
            if outcome is job_tx.CancelOutcome.NOTHING:  # already finished: no change
                return None
            return action, f"{job_id} ({outcome.value})"

        return self._db.write(
            audited_as, actor, describe, now, job_tx.job_cancel, job_id, now, kind
        )

    # -- reading ---------------------------------------------------------------

    def job_get(self, job_id: str) -> Pending[vs.Job]:
        """One runner job (NotFound)."""
        return self._db.read(job_tx.job_get, job_id)

    def job_list(self) -> Pending[list[vs.Job]]:
        """Every runner job (off the event loop: it may be long)."""
        return self._db.read_bulk(job_tx.job_list)

    def job_queue_position(self, job_id: str) -> Pending[tuple[int, str]]:
        """A QUEUED job's place in the queue, and the job blocking its scope if any."""
        return self._db.read(job_tx.job_queue_position, job_id)

    def jobs_queued_runner_ids(self) -> Pending[set[str | None]]:
        """The runners queued jobs are aimed at (None: any runner)."""
        return self._db.read(job_tx.jobs_queued_runner_ids)

    def jobs_count_by_state(self) -> Pending[list[tuple[str, str, int]]]:
        """(kind, state name, count) of every job, for metrics."""
        return self._db.read(job_tx.jobs_count_by_state)

    # -- timers and pruning ----------------------------------------------------

    def jobs_fire_timers(self, now: int, hang: float) -> Pending[timer_tx.Fired]:
        """Fire every due deadline of every kind (expiry, ack, heartbeat, hang) at once."""
        return self._db.write(timer_tx.jobs_fire_timers, now, hang)

    def jobs_next_deadline(self) -> Pending[int | None]:
        """The earliest armed deadline (microseconds), or None."""
        return self._db.read(timer_tx.jobs_next_deadline)

    def jobs_prune(self, keep: int, actor: Actor | None = None, now: int = 0) -> Pending[int]:
        """Delete all but the newest `keep` finished runner jobs; how many went (audited)."""
        obj = f"finished runner jobs but the newest {keep}"
        return self._db.write_bulk(
            audited, actor, "jobs.prune", obj, now, timer_tx.jobs_prune, keep
        )

    # -- output ----------------------------------------------------------------

    def output_append(self, job_id: str, first_seq: int, batches: list[bytes]) -> Pending[None]:
        """Persist a job's output batches, numbered from `first_seq`."""
        return self._db.write(output_tx.output_append, job_id, first_seq, batches)

    def output_read(self, job_id: str, after_seq: int = -1) -> Pending[list[tuple[int, bytes]]]:
        """A job's output batches after `after_seq`, at most 1000 (off the event loop)."""
        return self._db.read_bulk(output_tx.output_read, job_id, after_seq)

    def output_for_scope(
        self, kind: str, ref: output_tx.ScopeRef, cursor: dict[str, int], since: int | None
    ) -> Pending[list[tuple[str, int, bytes]]]:
        """Output of every job on a basis, project or target past `cursor`."""
        return self._db.read(output_tx.scope_output, kind, ref, cursor, since)
