"""`waystation template|workspace|quota`: Coder-style provisioning for people.

The helpers that show and follow provisioner jobs are shared with
`waystation provisioner` (cli/provisioner.py).
"""

from __future__ import annotations

import getpass
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.text import Text

from waystation.cli.output import (
    Context,
    call,
    err,
    fail,
    out,
    parse_pairs,
    print_json,
    print_table,
    rpc_errors,
)
from waystation.cli.watch import PendingClock
from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.protocol.waystation.v1 import provisioning_pb2_grpc as pv_grpc

Job = pv.ProvisionerJob
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
Detach = Annotated[
    bool, typer.Option("--detach", "-d", help="Queue and return; do not follow the logs.")
]
Params = Annotated[
    list[str] | None, typer.Option("--param", "-p", help="Rich parameter KEY=VALUE (repeat).")
]
Owner = Annotated[
    str,
    typer.Option(
        "--owner",
        envvar="WAYSTATION_USER",
        help="The workspace owner (others: admins only). [default: your token's user]",
    ),
]

template_app = typer.Typer(help="Push and list templates (what workspaces are built from).")
workspace_app = typer.Typer(help="Create, start, stop and delete workspaces.")
quota_app = typer.Typer(help="Per-user quota allowances (daily cost units).")


def stub(c: Context) -> pv_grpc.ProvisioningStub:
    return pv_grpc.ProvisioningStub(c.channel)


def _owner(c: Context, owner: str) -> str:
    # With a token the server takes the owner from it (naming another is for
    # admins); a server with auth off knows no user, so the local one goes.
    return owner or ("" if c.connection.token else getpass.getuser())


def _params(pairs: list[str] | None) -> list[sdk.RichParameterValue]:
    return [
        sdk.RichParameterValue(name=k, value=v)
        for k, v in parse_pairs(pairs or [], "--param").items()
    ]


STATUS_STYLE = {
    Job.SUCCEEDED: "green",
    Job.FAILED: "red",
    Job.CANCELED: "yellow",
    Job.CANCELING: "yellow",
    Job.RUNNING: "cyan",
    Job.PENDING: "",
}


def status_text(job: Job) -> Text:
    name = Job.Status.Name(job.status).lower()
    return Text(name, STATUS_STYLE.get(job.status, ""))


def pending_text(job: Job) -> str:
    if job.pending_reason:
        return job.pending_reason
    if job.queue_position:
        return f"queued, position {job.queue_position} of {job.queue_size}"
    return ""


def failure_text(job: Job) -> str:
    """A job's error with its code, as people see it (empty when it has none)."""
    if job.error and job.error_code:
        return f"{job.error} ({job.error_code})"
    return job.error or job.error_code


def watch(c: Context, job_id: str, logs: Console = out) -> Job:
    """Follow a job's logs live (to `logs`); return it as it ended."""
    stage = ""
    last = Job()
    clock = PendingClock(err, f"job {job_id}")  # how long it has been pending
    with rpc_errors(c, f"watching job {job_id}"):
        stream = stub(c).WatchProvisionerJob(pv.WatchProvisionerJobRequest(id=job_id))
        try:
            for event in stream:
                if event.HasField("job"):
                    last = event.job
                    if last.status == Job.PENDING:
                        waiting = pending_text(last) or "pending"
                        err.print(Text(f"job {job_id}: {waiting}", "dim"))
                        clock.pending(waiting)
                        continue
                    clock.stop()
                    if last.status == Job.RUNNING:
                        err.print(Text(f"job {job_id}: running on {last.daemon_id}", "dim"))
                    continue
                clock.stop()
                for line in event.logs.logs:
                    if line.stage and line.stage != stage:
                        stage = line.stage
                        logs.print(Text(f"==> {stage}", "bold"))
                    if line.output:
                        style = {sdk.ERROR: "red", sdk.WARN: "yellow"}.get(line.level, "")
                        logs.print(Text(line.output, style))
        finally:
            clock.stop()
    err.print(Text.assemble(f"job {job_id}: ", status_text(last)))
    return last


def exit_for(job: Job) -> None:
    """Exit 1 with the job's error and code unless it succeeded."""
    if job.status != Job.SUCCEEDED:
        fail(failure_text(job) or f"job {job.id} {Job.Status.Name(job.status).lower()}")


def cancel_job(c: Context, job_id: str) -> None:
    job = call(c, stub(c).CancelProvisionerJob, pv.CancelProvisionerJobRequest(id=job_id))
    err.print(Text.assemble(f"job {job.id}: ", status_text(job)))


def _resources(resources: Iterable[sdk.Resource], title: str) -> None:
    rows = [[r.type, r.name, str(r.daily_cost)] for r in resources]
    if rows:
        out.print(Text(title, "bold"))
        print_table(["type", "name", "daily cost"], rows, "")


# -- templates -----------------------------------------------------------------------


@template_app.command("push")
def template_push(
    ctx: typer.Context,
    directory: Annotated[Path, typer.Argument(help="The template's source directory.")],
    provisioner: Annotated[
        str, typer.Option("--provisioner", help="echo, terraform, or a plugin's name.")
    ],
    name: Annotated[
        str, typer.Option("--name", "-n", help="Template name. [default: the directory's name]")
    ] = "",
    tags: Annotated[
        list[str] | None, typer.Option("--tag", help="Daemon tag KEY=VALUE the jobs need.")
    ] = None,
    variables: Annotated[
        list[str] | None, typer.Option("--var", help="Template variable KEY=VALUE.")
    ] = None,
    version_name: Annotated[str, typer.Option("--version-name", help="[default: vN]")] = "",
    detach: Detach = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the version as JSON at the end (logs: stderr).")
    ] = False,
) -> None:
    """Upload DIRECTORY as a new template version and import it."""
    from waystation.errors import InvalidArgument
    from waystation.provisioner import archive

    if not directory.is_dir():
        fail(f"{directory} is not a directory")
    data = archive.pack(directory)
    try:
        archive.check(data)
    except InvalidArgument as exc:
        fail(exc.message)
    c: Context = ctx.obj
    request = pv.PushTemplateRequest(
        template=name or directory.resolve().name,
        provisioner=provisioner,
        tags=parse_pairs(tags or [], "--tag"),
        archive=data,
        user_variable_values=[
            sdk.VariableValue(name=k, value=v)
            for k, v in parse_pairs(variables or [], "--var").items()
        ],
        version_name=version_name,
    )
    pushed = call(c, stub(c).PushTemplate, request, about="push")
    version = pushed.version
    err.print(
        f"template {pushed.template.name} version {version.name}: import job {version.job_id}"
    )
    _warn_if_never_served(c, provisioner)
    if detach:
        if as_json:
            print_json(version)
        return
    job = _interruptible(
        lambda: watch(c, version.job_id, err if as_json else out),
        f"the import goes on (cancel it: waystation provisioner jobs cancel {version.job_id})",
    )
    if as_json:
        request_version = pv.GetTemplateVersionRequest(version=version.id)
        print_json(call(c, stub(c).GetTemplateVersion, request_version))
    elif job.status == Job.SUCCEEDED:
        version = call(
            c, stub(c).GetTemplateVersion, pv.GetTemplateVersionRequest(version=version.id)
        )
        params = [
            [p.name, p.type or "string", p.default_value, "yes" if p.required else "no"]
            for p in version.rich_parameters
        ]
        if params:
            out.print(Text("parameters", "bold"))
            print_table(["name", "type", "default", "required"], params, "")
        _resources(version.start_resources, "resources when started")
        _resources(version.stop_resources, "resources when stopped")
    exit_for(job)


def _warn_if_never_served(c: Context, provisioner: str) -> None:
    """Say at once when no daemon has ever served `provisioner` (a typo, or none set up)."""
    request = pv.ListProvisionerDaemonsRequest()
    daemons = call(c, stub(c).ListProvisionerDaemons, request).daemons
    if not any(provisioner in d.provisioners for d in daemons):
        err.print(
            Text.assemble(
                ("warning: ", "yellow"),
                f"no provisioner daemon has ever served {provisioner!r}: the job waits until "
                f"one does (start one: waystation provisioner --provisioner {provisioner})",
            )
        )


def _interruptible(follow: Callable[[], Job], goes_on: str) -> Job:
    """Follow a job; on Ctrl-C say that it goes on (and how to cancel it), exit 130."""
    try:
        return follow()
    except KeyboardInterrupt:
        err.print(f"stopped watching; {goes_on}")
        raise typer.Exit(130) from None


@template_app.command("init")
def template_init(
    directory: Annotated[Path, typer.Argument(help="Where to write the example.")],
) -> None:
    """Write an example echo template into DIRECTORY, ready for `template push`."""
    from waystation.provisioner import echo

    if directory.exists() and any(directory.iterdir()):
        fail(f"{directory} is not empty")
    names = echo.example(directory)
    err.print(f"wrote {len(names)} files to {directory}")
    err.print(f"next: waystation template push {directory} --provisioner echo")


@template_app.command("list")
def template_list(ctx: typer.Context, as_json: Json = False) -> None:
    """List templates."""
    c: Context = ctx.obj
    found = call(c, stub(c).ListTemplates, pv.ListTemplatesRequest()).templates
    if as_json:
        return print_json(list(found))
    rows = [[t.name, str(t.version_count), t.active_version_id or "(none yet)"] for t in found]
    print_table(["name", "versions", "active version"], rows, "no templates")


@template_app.command("versions")
def template_versions(ctx: typer.Context, template: str, as_json: Json = False) -> None:
    """List a template's versions and their imports."""
    c: Context = ctx.obj
    request = pv.ListTemplateVersionsRequest(template=template)
    found = call(c, stub(c).ListTemplateVersions, request).versions
    if as_json:
        return print_json(list(found))
    rows = [
        [
            v.name,
            v.id,
            v.provisioner,
            ",".join(f"{k}={val}" for k, val in sorted(v.tags.items())),
            Job.Status.Name(v.job.status).lower(),
            v.created_at.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
            failure_text(v.job),
        ]
        for v in found
    ]
    print_table(
        ["name", "id", "provisioner", "tags", "import", "created", "error"], rows, "no versions"
    )


# -- workspaces ----------------------------------------------------------------------


def _follow(c: Context, response: pv.BuildResponse, detach: bool, as_json: bool = False) -> None:
    build = response.build
    verb = sdk.WorkspaceTransition.Name(build.transition).lower()
    name = response.workspace.name
    err.print(f"workspace {name}: build #{build.build_number} ({verb}), job {build.job_id}")
    if detach:
        if as_json:
            print_json(build)
        return
    cancel = f"waystation workspace cancel {name}"
    if response.workspace.owner != (os.environ.get("WAYSTATION_USER") or getpass.getuser()):
        cancel += f" --owner {response.workspace.owner}"
    job = _interruptible(
        lambda: watch(c, build.job_id, err if as_json else out),
        f"the build goes on (cancel it: {cancel})",
    )
    if as_json:
        ref = pv.WorkspaceRef(id=response.workspace.id)
        shown = call(c, stub(c).GetWorkspace, pv.GetWorkspaceRequest(workspace=ref))
        print_json(next((b for b in shown.builds if b.id == build.id), build))
    exit_for(job)


@workspace_app.command("create")
def workspace_create(
    ctx: typer.Context,
    name: str,
    template: Annotated[
        str, typer.Option("--template", "-t", help="Template (its active version).")
    ],
    params: Params = None,
    owner: Owner = "",
    detach: Detach = False,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the build as JSON at the end (logs: stderr).")
    ] = False,
) -> None:
    """Create a workspace and start it."""
    c: Context = ctx.obj
    request = pv.CreateWorkspaceRequest(
        name=name, owner=_owner(c, owner), template=template, rich_parameter_values=_params(params)
    )
    _follow(c, call(c, stub(c).CreateWorkspace, request, about="create"), detach, as_json)


def _build(
    ctx: typer.Context,
    name: str,
    transition: sdk.WorkspaceTransition.ValueType,
    owner: str,
    params: list[str] | None,
    version: str,
    detach: bool,
) -> None:
    c: Context = ctx.obj
    request = pv.BuildWorkspaceRequest(
        workspace=pv.WorkspaceRef(owner=_owner(c, owner), name=name),
        transition=transition,
        rich_parameter_values=_params(params),
        template_version_id=version,
    )
    _follow(c, call(c, stub(c).BuildWorkspace, request), detach)


Version = Annotated[str, typer.Option("--version", help="Template version (id, or TEMPLATE@NAME).")]


@workspace_app.command("start")
def workspace_start(
    ctx: typer.Context,
    name: str,
    params: Params = None,
    owner: Owner = "",
    version: Version = "",
    detach: Detach = False,
) -> None:
    """Start a workspace (on the template's active version unless --version)."""
    _build(ctx, name, sdk.START, owner, params, version, detach)


@workspace_app.command("stop")
def workspace_stop(
    ctx: typer.Context, name: str, owner: Owner = "", detach: Detach = False
) -> None:
    """Stop a workspace."""
    _build(ctx, name, sdk.STOP, owner, None, "", detach)


@workspace_app.command("delete")
def workspace_delete(
    ctx: typer.Context, name: str, owner: Owner = "", detach: Detach = False
) -> None:
    """Destroy a workspace's resources and delete it."""
    _build(ctx, name, sdk.DESTROY, owner, None, "", detach)


@workspace_app.command("cancel")
def workspace_cancel(ctx: typer.Context, name: str, owner: Owner = "") -> None:
    """Cancel the workspace's pending or running build."""
    c: Context = ctx.obj
    ref = pv.WorkspaceRef(owner=_owner(c, owner), name=name)
    shown = call(c, stub(c).GetWorkspace, pv.GetWorkspaceRequest(workspace=ref))
    cancel_job(c, shown.workspace.latest_build.job_id)


@workspace_app.command("list")
def workspace_list(
    ctx: typer.Context,
    owner: Annotated[str, typer.Option("--owner", help="Only this owner's.")] = "",
    include_deleted: Annotated[bool, typer.Option("--all", help="Include deleted ones.")] = False,
    as_json: Json = False,
) -> None:
    """List workspaces."""
    c: Context = ctx.obj
    request = pv.ListWorkspacesRequest(owner=owner, include_deleted=include_deleted)
    found = call(c, stub(c).ListWorkspaces, request).workspaces
    if as_json:
        return print_json(list(found))
    rows = []
    for w in found:
        build = w.latest_build
        last = f"#{build.build_number} {sdk.WorkspaceTransition.Name(build.transition).lower()}"
        status = "deleted" if w.deleted else Job.Status.Name(build.job.status).lower()
        rows.append([w.owner, w.name, w.template_name, last, status, str(build.daily_cost)])
    print_table(
        ["owner", "name", "template", "last build", "status", "daily cost"], rows, "no workspaces"
    )


@workspace_app.command("show")
def workspace_show(ctx: typer.Context, name: str, owner: Owner = "", as_json: Json = False) -> None:
    """Show a workspace, its resources and its builds."""
    c: Context = ctx.obj
    ref = pv.WorkspaceRef(owner=_owner(c, owner), name=name)
    shown = call(c, stub(c).GetWorkspace, pv.GetWorkspaceRequest(workspace=ref))
    if as_json:
        return print_json(shown)
    w = shown.workspace
    out.print(Text.assemble(("workspace ", "bold"), f"{w.owner}/{w.name} ({w.id})"))
    out.print(f"template: {w.template_name}" + ("  [deleted]" if w.deleted else ""))
    latest = [b for b in shown.builds if b.job.status == Job.SUCCEEDED]
    if latest:
        _resources(latest[0].resources, "resources")
    rows = [
        [
            f"#{b.build_number}",
            sdk.WorkspaceTransition.Name(b.transition).lower(),
            Job.Status.Name(b.job.status).lower(),
            str(b.daily_cost),
            b.job_id,
            failure_text(b.job),
        ]
        for b in shown.builds
    ]
    print_table(["build", "transition", "status", "daily cost", "job", "error"], rows, "no builds")


@workspace_app.command("dry-run")
def workspace_dry_run(
    ctx: typer.Context,
    template: Annotated[str, typer.Option("--template", "-t", help="Template or version.")],
    name: Annotated[str, typer.Option("--name", help="Workspace name to plan as.")] = "dry-run",
    params: Params = None,
    owner: Owner = "",
) -> None:
    """Plan a workspace from a template without creating anything."""
    c: Context = ctx.obj
    request = pv.DryRunRequest(
        version=template,
        workspace_name=name,
        owner=_owner(c, owner),
        rich_parameter_values=_params(params),
    )
    job = call(c, stub(c).DryRun, request, about="dry run")
    err.print(f"dry run: job {job.id}")
    job = watch(c, job.id)
    if job.status == Job.SUCCEEDED:
        job = call(c, stub(c).GetProvisionerJob, pv.GetProvisionerJobRequest(id=job.id))
        _resources(job.dry_run_resources, "planned resources")
    exit_for(job)


# -- quotas --------------------------------------------------------------------------


def _show_quota(quota: pv.Quota) -> None:
    allowance = str(quota.allowance) if quota.configured else "unlimited"
    out.print(f"{quota.user}: {quota.consumed} of {allowance} in use (daily cost)")


@quota_app.command("set")
def quota_set(
    ctx: typer.Context,
    user: str,
    allowance: Annotated[int, typer.Argument(min=0, help="Daily cost units.")],
) -> None:
    """Set a user's allowance."""
    c: Context = ctx.obj
    _show_quota(call(c, stub(c).SetQuota, pv.SetQuotaRequest(user=user, allowance=allowance)))


@quota_app.command("clear")
def quota_clear(ctx: typer.Context, user: str) -> None:
    """Remove a user's allowance (no limit)."""
    c: Context = ctx.obj
    _show_quota(call(c, stub(c).SetQuota, pv.SetQuotaRequest(user=user, clear=True)))


@quota_app.command("show")
def quota_show(ctx: typer.Context, user: str, as_json: Json = False) -> None:
    """Show a user's allowance and what is in use."""
    c: Context = ctx.obj
    quota = call(c, stub(c).GetQuota, pv.GetQuotaRequest(user=user))
    print_json(quota) if as_json else _show_quota(quota)


apps = {
    "template": template_app,
    "workspace": workspace_app,
    "quota": quota_app,
}
