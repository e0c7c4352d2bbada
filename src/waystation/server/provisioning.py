"""`waystation.v1.Provisioning`: templates, workspaces, quotas and provisioner jobs for people."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from grpc import aio

from waystation.auth.policy import owner_refusal
from waystation.core.timeouts import now_us
from waystation.engine.engine import JobEngine
from waystation.engine.feed import job_topic, output_topic, wait
from waystation.errors import InvalidArgument, PermissionDenied
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.provisioner import archive
from waystation.server.errors import rpc, stream_rpc
from waystation.server.principal import current_actor, current_principal
from waystation.server.unimplemented import fill_unimplemented
from waystation.store import provisioner_queue as pq

DESCRIPTOR = pv.DESCRIPTOR.services_by_name["Provisioning"]
SERVICE = DESCRIPTOR.full_name
Ctx = aio.ServicerContext[Any, Any]
Job = pv.ProvisionerJob
ENDED = (Job.SUCCEEDED, Job.FAILED, Job.CANCELED)


class ProvisioningService:
    def __init__(self, engine: JobEngine) -> None:
        self.engine = engine
        self.store = engine.store
        fill_unimplemented(self, DESCRIPTOR)

    # -- templates -----------------------------------------------------------

    @rpc
    async def PushTemplate(
        self, request: pv.PushTemplateRequest, context: Ctx
    ) -> pv.PushTemplateResponse:
        digest = archive.check(request.archive)
        template, version = await self.engine.template_push(request, digest, current_actor(context))
        return pv.PushTemplateResponse(template=template, version=version)

    @rpc
    async def ListTemplates(
        self, request: pv.ListTemplatesRequest, context: Ctx
    ) -> pv.ListTemplatesResponse:
        return pv.ListTemplatesResponse(templates=await self.store.template_list())

    @rpc
    async def ListTemplateVersions(
        self, request: pv.ListTemplateVersionsRequest, context: Ctx
    ) -> pv.ListTemplateVersionsResponse:
        versions = await self.store.template_version_list(request.template)
        return pv.ListTemplateVersionsResponse(versions=versions)

    @rpc
    async def GetTemplateVersion(
        self, request: pv.GetTemplateVersionRequest, context: Ctx
    ) -> pv.TemplateVersion:
        version_id = await self.store.template_version_resolve(request.version)
        return await self.store.template_version_get(version_id)

    # -- workspaces ----------------------------------------------------------

    @rpc
    async def CreateWorkspace(
        self, request: pv.CreateWorkspaceRequest, context: Ctx
    ) -> pv.BuildResponse:
        request.owner = _owner(context, request.owner)
        workspace, build = await self.engine.workspace_create(request, current_actor(context))
        return pv.BuildResponse(workspace=workspace, build=build)

    @rpc
    async def BuildWorkspace(
        self, request: pv.BuildWorkspaceRequest, context: Ctx
    ) -> pv.BuildResponse:
        await self._may_act_on(context, request.workspace)
        workspace, build = await self.engine.workspace_build(request, current_actor(context))
        return pv.BuildResponse(workspace=workspace, build=build)

    @rpc
    async def ListWorkspaces(
        self, request: pv.ListWorkspacesRequest, context: Ctx
    ) -> pv.ListWorkspacesResponse:
        # A listing may be long: off the event loop, like job listings.
        found = await self.store.workspace_list(request.owner, request.include_deleted)
        return pv.ListWorkspacesResponse(workspaces=found)

    @rpc
    async def GetWorkspace(
        self, request: pv.GetWorkspaceRequest, context: Ctx
    ) -> pv.GetWorkspaceResponse:
        if not request.workspace.id:  # reading any owner's is fine; none given means yours
            request.workspace.owner = _owner(context, request.workspace.owner, reading=True)
        return await self.store.workspace_show(request.workspace)

    @rpc
    async def DryRun(self, request: pv.DryRunRequest, context: Ctx) -> Job:
        request.owner = _owner(context, request.owner)
        job_id = await self.engine.template_dry_run(request)
        return await self._job(job_id)

    # -- quotas --------------------------------------------------------------

    @rpc
    async def SetQuota(self, request: pv.SetQuotaRequest, context: Ctx) -> pv.Quota:
        allowance = None if request.clear else request.allowance
        return await self.store.quota_set(request.user, allowance, current_actor(context), now_us())

    @rpc
    async def GetQuota(self, request: pv.GetQuotaRequest, context: Ctx) -> pv.Quota:
        return await self.store.quota_get(_owner(context, request.user, reading=True))

    # -- jobs and daemons ----------------------------------------------------

    async def _job(self, job_id: str) -> Job:
        return await self.store.provisioner_job_view(job_id, now_us())

    @rpc
    async def ListProvisionerJobs(
        self, request: pv.ListProvisionerJobsRequest, context: Ctx
    ) -> pv.ListProvisionerJobsResponse:
        limit = min(request.limit or 100, 10_000)
        found = await self.store.provisioner_job_list(request.pending_only, limit, now_us())
        return pv.ListProvisionerJobsResponse(jobs=found)

    @rpc
    async def GetProvisionerJob(self, request: pv.GetProvisionerJobRequest, context: Ctx) -> Job:
        return await self._job(request.id)

    @rpc
    async def CancelProvisionerJob(
        self, request: pv.CancelProvisionerJobRequest, context: Ctx
    ) -> Job:
        caller = current_principal(context)
        if caller is not None and not caller.admin:
            job = await self._job(request.id)
            # A workspace build is its owner's to cancel; other jobs anyone's.
            if job.type == Job.WORKSPACE_BUILD:
                _refuse(owner_refusal(caller, job.owner, f"job {job.id} (a workspace build)"))
        await self.engine.cancel(request.id, pq.KIND, current_actor(context))
        return await self._job(request.id)

    async def _may_act_on(self, context: Ctx, ref: pv.WorkspaceRef) -> None:
        """A member acts on their own workspaces only; no owner given means theirs."""
        if ref.id:
            caller = current_principal(context)
            if caller is not None and not caller.admin:
                shown = await self.store.workspace_show(ref)
                owner = shown.workspace.owner
                _refuse(owner_refusal(caller, owner, f"workspace {shown.workspace.name}"))
        else:
            ref.owner = _owner(context, ref.owner)

    @rpc
    async def ListProvisionerDaemons(
        self, request: pv.ListProvisionerDaemonsRequest, context: Ctx
    ) -> pv.ListProvisionerDaemonsResponse:
        found = await self.store.daemons_list(now_us())
        return pv.ListProvisionerDaemonsResponse(daemons=found)

    @stream_rpc
    async def WatchProvisionerJob(
        self, request: pv.WatchProvisionerJobRequest, context: Ctx
    ) -> AsyncIterator[pv.WatchProvisionerJobResponse]:
        """Logs as they are stored, the job when it changes; the end after its final state."""
        job_id = request.id
        await self._job(job_id)  # NOT_FOUND before any message
        shown: tuple[int, str, str] | None = None
        after = -1
        with self.engine.feed.subscribe(job_topic(job_id), output_topic(job_id)) as wake:
            while True:
                wake.clear()
                job = await self._job(job_id)
                # Output is read after the state, so a final state has all its lines here.
                while True:
                    rows = await self.store.output_read(job_id, after)
                    for seq, data in rows:
                        after = seq
                        logs = pv.WatchProvisionerJobResponse.Logs.FromString(data)
                        yield pv.WatchProvisionerJobResponse(logs=logs)
                    if len(rows) < 1000:
                        break
                now = (job.status, job.daemon_id, job.pending_reason)
                if now != shown:
                    shown = now
                    yield pv.WatchProvisionerJobResponse(job=job)
                if job.status in ENDED:
                    return
                await wait(wake, self.engine.timeouts.poll)


def _owner(context: Ctx, requested: str, *, reading: bool = False) -> str:
    """The owner a call acts as: the caller's user, always, unless an admin names
    another (or the call only reads). With auth off there is no caller: the
    request must say."""
    caller = current_principal(context)
    if caller is None:
        if not requested:
            raise InvalidArgument("owner is required (this server has auth off)")
        return requested
    if not requested or requested.lower() == caller.user.lower():
        return caller.user
    if not reading and not caller.admin:
        raise PermissionDenied(
            f"acting as another owner ({requested}) needs the admin role; your token's user "
            f"{caller.user} is a {caller.role.value}"
        )
    return requested


def _refuse(problem: str) -> None:
    if problem:
        raise PermissionDenied(problem)
