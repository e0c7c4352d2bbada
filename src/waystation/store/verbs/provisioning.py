"""Verbs of the Coder side: templates, workspaces, quotas, daemons, provisioner jobs."""

from __future__ import annotations

from collections.abc import Callable, Iterable

from waystation.core.roles import Actor
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.store import daemons as daemon_tx
from waystation.store import provisioner_jobs as pjob_tx
from waystation.store import provisioner_views as pview_tx
from waystation.store import quotas as quota_tx
from waystation.store import templates as template_tx
from waystation.store import workspaces as workspace_tx
from waystation.store.audit import audited, audited_as
from waystation.store.provisioner_queue import Daemon, Queued
from waystation.store.verbs.base import Pending, Verbs


class TemplateVerbs(Verbs):
    def template_push(
        self,
        request: pv.PushTemplateRequest,
        archive_hash: str,
        now: int,
        actor: Actor | None = None,
    ) -> Pending[tuple[pv.Template, pv.TemplateVersion, Queued]]:
        """A new version of a template (created if new), its import job queued; audited."""
        return self._db.write(
            audited_as,
            actor,
            _pushed,
            now,
            template_tx.template_push,
            request,
            archive_hash,
            now,
        )

    def template_list(self) -> Pending[list[pv.Template]]:
        """Every template."""
        return self._db.read(template_tx.template_list)

    def template_version_list(self, name: str) -> Pending[list[pv.TemplateVersion]]:
        """A template's versions, oldest first."""
        return self._db.read(template_tx.template_versions_list, name)

    def template_version_resolve(self, ref: str) -> Pending[str]:
        """The id of the version `ref` names (an id, `template`, or `template@version`)."""
        return self._db.read(template_tx.version_resolve, ref)

    def template_version_get(self, version_id: str) -> Pending[pv.TemplateVersion]:
        """One template version, with its import job."""
        return self._db.read(template_tx.version_get, version_id)

    def template_dry_run(self, request: pv.DryRunRequest, now: int) -> Pending[tuple[str, Queued]]:
        """Queue a plan-only job of a template version; its id."""
        return self._db.write(template_tx.dry_run, request, now)


class WorkspaceVerbs(Verbs):
    def workspace_create(
        self, request: pv.CreateWorkspaceRequest, now: int, actor: Actor | None = None
    ) -> Pending[tuple[pv.Workspace, pv.WorkspaceBuild, Queued]]:
        """A new workspace and its first (START) build, queued; audited."""
        return self._db.write(
            audited_as,
            actor,
            _built("workspace.create"),
            now,
            workspace_tx.workspace_create,
            request,
            now,
        )

    def workspace_build(
        self, request: pv.BuildWorkspaceRequest, now: int, actor: Actor | None = None
    ) -> Pending[tuple[pv.Workspace, pv.WorkspaceBuild, Queued]]:
        """A build of a workspace (START, STOP, DESTROY), queued; audited by its transition."""
        action = "workspace." + _TRANSITIONS.get(request.transition, "build")
        return self._db.write(
            audited_as,
            actor,
            _built(action),
            now,
            workspace_tx.workspace_build,
            request,
            now,
        )

    def workspace_list(self, owner: str, include_deleted: bool) -> Pending[list[pv.Workspace]]:
        """Workspaces with their latest builds (off the event loop: maybe many)."""
        return self._db.read_bulk(workspace_tx.workspace_list, owner, include_deleted)

    def workspace_show(self, ref: pv.WorkspaceRef) -> Pending[pv.GetWorkspaceResponse]:
        """A workspace with all its builds."""
        return self._db.read(workspace_tx.workspace_show, ref)


class QuotaVerbs(Verbs):
    def quota_set(
        self, user: str, allowance: int | None, actor: Actor | None = None, now: int = 0
    ) -> Pending[pv.Quota]:
        """Set a user's daily cost allowance (None: no limit), audited if `actor` is given."""
        obj = f"{user}: {'no limit' if allowance is None else allowance}"
        return self._db.write(
            audited, actor, "quota.set", obj, now, quota_tx.quota_set, user, allowance
        )

    def quota_get(self, user: str) -> Pending[pv.Quota]:
        """A user's allowance and what their workspaces consume."""
        return self._db.read(quota_tx.quota_get, user)

    def quota_commit(
        self, daemon_id: str, request: pd.CommitQuotaRequest, now: int, hang: int
    ) -> Pending[pd.CommitQuotaResponse]:
        """A build's CommitQuota: whether its cost fits its owner's allowance."""
        return self._db.write(quota_tx.commit_quota, daemon_id, request, now, hang)


class DaemonVerbs(Verbs):
    def daemon_left(self, daemon_id: str, now: int) -> Pending[None]:
        """The daemon said goodbye: not connected any more."""
        return self._db.write(daemon_tx.daemon_left, daemon_id, now)

    def daemons_renew(self, daemon_ids: Iterable[str], now: int, lease: int) -> Pending[None]:
        """Parked daemons stay online another lease (off the event loop)."""
        return self._db.write_bulk(daemon_tx.daemons_renew, daemon_ids, now, lease)

    def daemons_list(self, now: int) -> Pending[list[pv.ProvisionerDaemon]]:
        """Every daemon: provisioners, tags, last seen, its job."""
        return self._db.read(daemon_tx.daemons_list, now)


class ProvisionerJobVerbs(Verbs):
    def provisioner_job_acquire(
        self, daemon: Daemon, now: int, hang: int, lease: int
    ) -> Pending[tuple[pd.AcquiredJob | None, list[str]]]:
        """QUEUED -> RUNNING for the oldest job fitting the daemon; jobs failed meanwhile."""
        return self._db.write(pjob_tx.job_acquire, daemon, now, hang, lease)

    def provisioner_job_update(
        self, daemon_id: str, request: pd.UpdateJobRequest, now: int, hang: int
    ) -> Pending[pjob_tx.Updated]:
        """A daemon's UpdateJob: logs, variables, readme; its heartbeat."""
        return self._db.write(pjob_tx.job_update, daemon_id, request, now, hang)

    def provisioner_job_complete(
        self, daemon_id: str, completed: pd.CompletedJob, now: int
    ) -> Pending[None]:
        """RUNNING -> SUCCESS with the job's results (state, resources, parameters)."""
        return self._db.write(pjob_tx.job_complete, daemon_id, completed, now)

    def provisioner_job_fail(self, daemon_id: str, failed: pd.FailedJob, now: int) -> Pending[None]:
        """RUNNING -> ERROR with the daemon's error (and a build's partial state)."""
        return self._db.write(pjob_tx.job_fail, daemon_id, failed, now)

    def provisioner_job_broken(self, job_id: str, daemon_id: str, now: int) -> Pending[bool]:
        """The acquiring call went away: the job fails (as upstream); whether it did."""
        return self._db.write(pjob_tx.connection_broken, job_id, daemon_id, now)

    def provisioner_job_view(self, job_id: str, now: int) -> Pending[pv.ProvisionerJob]:
        """A provisioner job as people see it, with its queue position."""
        return self._db.read(pview_tx.job_view, job_id, now)

    def provisioner_job_list(
        self, pending_only: bool, limit: int, now: int
    ) -> Pending[list[pv.ProvisionerJob]]:
        """Provisioner jobs, newest first (or only the pending ones)."""
        return self._db.read(pview_tx.job_list, pending_only, limit, now)

    def provisioner_jobs_queued_kinds(self) -> Pending[list[tuple[str, dict[str, str]]]]:
        """(provisioner, tags) of the queued provisioner jobs, for waking daemons."""
        return self._db.read(pview_tx.jobs_queued_kinds)


# How the audit log names a workspace build: `workspace.start|stop|delete`.
_TRANSITIONS = {sdk.START: "start", sdk.STOP: "stop", sdk.DESTROY: "delete"}

Built = tuple[pv.Workspace, pv.WorkspaceBuild, Queued]


def _built(action: str) -> Callable[[Built], tuple[str, str]]:
    """The audit row of a workspace build: `owner/name`, build number and job."""

    def describe(result: Built) -> tuple[str, str]:
        workspace, build, _ = result
        where = f"{workspace.owner}/{workspace.name} build {build.build_number} job {build.job_id}"
        return action, where

    return describe


def _pushed(result: tuple[pv.Template, pv.TemplateVersion, Queued]) -> tuple[str, str]:
    template, version, _ = result
    return "template.push", f"{template.name}@{version.name} job {version.job_id}"
