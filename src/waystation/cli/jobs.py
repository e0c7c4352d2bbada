"""`waystation job ...` and `waystation run COMMAND --target T`."""

from __future__ import annotations

import posixpath
import threading
import time
from typing import Annotated

import grpc
import typer
from google.protobuf.empty_pb2 import Empty
from rich.progress import Progress, SpinnerColumn, TextColumn

from waystation.cli.output import Context, call, err, fail, out, print_json, print_table, rpc_errors
from waystation.cli.watch import Renderer, Waiting, exit_code, rows, state_text, summary
from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.waystation.v1 import admin_pb2 as admin
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc

app = typer.Typer(help="Queue, list, watch and cancel jobs.", no_args_is_help=True)
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
OPERATIONS = ("command", "noop", "validate", "init", "docs", "auth")

TargetOpt = Annotated[str, typer.Option("--target", "-t", help="Target (machine) name or id.")]
ProjectOpt = Annotated[str, typer.Option("--project", "-p", help="Project name or id.")]
BasisOpt = Annotated[str, typer.Option("--basis", "-b", help="Basis name or id.")]
RunnerOpt = Annotated[
    str, typer.Option("--runner", "-r", help="Run on this runner id (default: any runner).")
]
ExpiresOpt = Annotated[
    str, typer.Option("--expires-in", help="Cancel if no runner took it by then, e.g. 10m.")
]
GitOpt = Annotated[
    str,
    typer.Option(
        "--git", metavar="URL", help="Data source: the runner works in a checkout of this repo."
    ),
]
RefOpt = Annotated[
    str,
    typer.Option("--ref", help="With --git: branch, tag or commit (default: the repo's HEAD)."),
]
PathOpt = Annotated[
    str, typer.Option("--path", help="With --git: the subdirectory to work in (relative).")
]
LocalOpt = Annotated[
    bool,
    typer.Option(
        "--local",
        # Square brackets would be taken for Rich markup and vanish from --help.
        help="Data source: the runner's own files (the default, unless the job's project "
        "or basis has a data source of its own).",
    ),
]


def _stubs(ctx: typer.Context) -> tuple[Context, vs_grpc.VagrantStub]:
    c: Context = ctx.obj
    return c, vs_grpc.VagrantStub(c.channel)


def _scope(ctx: typer.Context, target: str, project: str, basis: str, create: bool) -> vs.Job:
    """A job carrying the scope the user named (and nothing else yet)."""
    c, stub = _stubs(ctx)
    job = vs.Job()
    if target:
        job.target.CopyFrom(_target_ref(c, stub, target, project, create))
    elif project:
        query = vs.Project(resource_id=project, name=project, path=project)
        found = call(c, stub.FindProject, vs.FindProjectRequest(project=query)).project
        job.project.CopyFrom(sdk.Ref.Project(resource_id=found.resource_id, name=found.name))
    elif basis:
        query_b = vs.Basis(resource_id=basis, name=basis, path=basis)
        found_b = call(c, stub.FindBasis, vs.FindBasisRequest(basis=query_b)).basis
        job.basis.CopyFrom(sdk.Ref.Basis(resource_id=found_b.resource_id, name=found_b.name))
    return job


def _target_ref(
    c: Context, stub: vs_grpc.VagrantStub, name: str, project: str, create: bool
) -> sdk.Ref.Target:
    """Find the target; with `create`, make it (and a default project) if missing."""
    targets = call(c, stub.ListTargets, Empty()).targets
    matches = [
        t
        for t in targets
        if name in (t.resource_id, t.name) or t.name.lower() == name.lower()
        if not project or project in (t.project.name, t.project.resource_id)
    ]
    if len(matches) > 1:
        fail(f"target {name!r} exists in several projects: give --project")
    if matches:
        return sdk.Ref.Target(resource_id=matches[0].resource_id, name=matches[0].name)
    if not create:
        fail(f"no target {name!r}: create it with `waystation target upsert {name} --project P`")
    project_ref = _project_for_new_target(c, stub, project)
    made = call(
        c,
        stub.UpsertTarget,
        vs.UpsertTargetRequest(project=project_ref, target=vs.Target(name=name)),
    ).target
    err.print(f"created target {made.name} in project {made.project.name}")
    return sdk.Ref.Target(resource_id=made.resource_id, name=made.name)


def _project_for_new_target(c: Context, stub: vs_grpc.VagrantStub, project: str) -> sdk.Ref.Project:
    if project:
        query = vs.Project(resource_id=project, name=project, path=project)
        found = call(c, stub.FindProject, vs.FindProjectRequest(project=query)).project
        return sdk.Ref.Project(resource_id=found.resource_id)
    projects = call(c, stub.ListProjects, Empty()).projects
    if len(projects) == 1:
        return sdk.Ref.Project(resource_id=projects[0].resource_id)
    if projects:
        fail("several projects exist: give --project for the new target")
    # A fresh server: make a default basis and project to hold it.
    basis = call(
        c,
        stub.UpsertBasis,
        vs.UpsertBasisRequest(basis=vs.Basis(name="default", path="/waystation/default")),
    ).basis
    made = call(
        c,
        stub.UpsertProject,
        vs.UpsertProjectRequest(
            project=vs.Project(
                name="default",
                path="/waystation/default/project",
                basis=sdk.Ref.Basis(resource_id=basis.resource_id),
            )
        ),
    ).project
    return sdk.Ref.Project(resource_id=made.resource_id)


def _data_source(git: str, ref: str, path: str, local: bool) -> vs.Job.DataSource | None:
    """What the flags ask for; None for the default. Checked before anything is created."""
    if git and local:
        fail("--git and --local are two data sources: give one")
    if (ref or path) and not git:
        fail("--ref and --path go with --git URL")
    if git:
        normalized = posixpath.normpath(path or ".")
        if posixpath.isabs(path) or normalized == ".." or normalized.startswith("../"):
            fail(f"--path must be relative and stay inside the repository, got {path!r}")
        return vs.Job.DataSource(git=vs.Job.Git(url=git, ref=ref, path=path))
    if local:
        return vs.Job.DataSource(local=vs.Job.Local())
    return None


def _set_data_source(ctx: typer.Context, job: vs.Job, source: vs.Job.DataSource | None) -> None:
    """Every job we queue carries a data source (upstream's runner fails one without).

    The default is Local, as upstream's client sets, unless the job's project or
    basis has a data source of its own: then none is sent and the server gives the
    job that one (QueueJob's rule), so it carries one either way.
    """
    if source is not None:
        job.data_source.CopyFrom(source)
        return
    c, stub = _stubs(ctx)
    kind = job.WhichOneof("scope")
    project_id = basis_id = ""
    if kind == "target":
        query = vs.Target(resource_id=job.target.resource_id)
        project_id = call(
            c, stub.FindTarget, vs.FindTargetRequest(target=query)
        ).target.project.resource_id
    elif kind == "project":
        project_id = job.project.resource_id
    elif kind == "basis":
        basis_id = job.basis.resource_id
    if project_id:
        query_p = vs.Project(resource_id=project_id)
        project = call(c, stub.FindProject, vs.FindProjectRequest(project=query_p)).project
        if project.HasField("data_source"):
            return
        basis_id = project.basis.resource_id
    if basis_id:
        query_b = vs.Basis(resource_id=basis_id)
        if call(c, stub.FindBasis, vs.FindBasisRequest(basis=query_b)).basis.HasField(
            "data_source"
        ):
            return
    job.data_source.local.SetInParent()


def _build(
    job: vs.Job, operation: str, command: str | None, args: list[str], runner: str
) -> vs.Job:
    if runner:
        job.target_runner.id.id = runner
    else:
        job.target_runner.any.SetInParent()
    if operation == "command":
        if not command:
            fail("a command job needs a COMMAND (e.g. `up`, `exec`)")
        job.command.command = command
        job.command.cli_args.args.extend(args)
    elif operation in OPERATIONS:
        getattr(job, operation).SetInParent()
    else:
        fail(f"--op must be one of {', '.join(OPERATIONS)}, got {operation!r}")
    return job


def _queue(ctx: typer.Context, job: vs.Job, expires_in: str) -> str:
    c, stub = _stubs(ctx)
    request = vs.QueueJobRequest(job=job, expires_in=expires_in)
    return call(c, stub.QueueJob, request).job_id


@app.command("queue")
def queue(
    ctx: typer.Context,
    command: Annotated[str | None, typer.Argument(help="The command to run, e.g. up.")] = None,
    args: Annotated[list[str] | None, typer.Argument(help="Its arguments.")] = None,
    target: TargetOpt = "",
    project: ProjectOpt = "",
    basis: BasisOpt = "",
    runner: RunnerOpt = "",
    expires_in: ExpiresOpt = "",
    operation: Annotated[str, typer.Option("--op", help="Operation: " + ", ".join(OPERATIONS))] = (
        "command"
    ),
    git: GitOpt = "",
    ref: RefOpt = "",
    path: PathOpt = "",
    local: LocalOpt = False,
) -> None:
    """Queue a job and print its id."""
    source = _data_source(git, ref, path, local)
    job = _build(_scope(ctx, target, project, basis, False), operation, command, args or [], runner)
    _set_data_source(ctx, job, source)
    out.print(_queue(ctx, job, expires_in))


@app.command("run")
def run(
    ctx: typer.Context,
    command: Annotated[str, typer.Argument(help="The command to run, e.g. up.")],
    args: Annotated[
        list[str] | None,
        typer.Argument(help="Its arguments, after `--` (e.g. exec ... -- 'uname -a')."),
    ] = None,
    target: TargetOpt = "",
    project: ProjectOpt = "",
    basis: BasisOpt = "",
    runner: RunnerOpt = "",
    expires_in: ExpiresOpt = "",
    git: GitOpt = "",
    ref: RefOpt = "",
    path: PathOpt = "",
    local: LocalOpt = False,
) -> None:
    """Queue a command on a target and watch it; exit with its status.

    Arguments for the command itself go after `--`; an option before it that
    `run` does not know is an error, never passed on.
    """
    if not (target or project or basis):
        fail("say where to run it: --target NAME (or --project / --basis)")
    source = _data_source(git, ref, path, local)
    job = _build(_scope(ctx, target, project, basis, True), "command", command, args or [], runner)
    _set_data_source(ctx, job, source)
    job_id = _queue(ctx, job, expires_in)
    err.print(f"queued job {job_id}")
    raise typer.Exit(_watch(ctx, job_id))


@app.command("watch")
def watch(ctx: typer.Context, job_id: str) -> None:
    """Follow a job's output live; exit with its status."""
    raise typer.Exit(_watch(ctx, job_id))


def _watch(ctx: typer.Context, job_id: str) -> int:
    c, stub = _stubs(ctx)
    started = time.monotonic()
    spinner = Waiting(err, "waiting for the job...") if err.is_terminal else None
    if spinner is not None:
        spinner.start()
    renderer = Renderer(out, spinner)
    queued = _QueueNotes(
        c, call(c, stub.GetJob, vs.GetJobRequest(job_id=job_id), about=f"job {job_id}"), renderer
    )
    try:
        with rpc_errors(c):
            for response in stub.GetJobStream(vs.GetJobStreamRequest(job_id=job_id)):
                if response.WhichOneof("event") == "state":
                    queued.update(response.state.current)
                renderer.render(response)
                if response.WhichOneof("event") == "complete":
                    break
    except KeyboardInterrupt:
        renderer.close()
        err.print(f"stopped watching; the job goes on (cancel: waystation job cancel {job_id})")
        return 130
    finally:
        queued.stop()
        renderer.close()
    job = call(c, stub.GetJob, vs.GetJobRequest(job_id=job_id))
    err.print(summary(job, started))
    return exit_code(job)


class _QueueNotes:
    """While the job is QUEUED, keep 'queued, position N' / 'blocked by X' current."""

    def __init__(self, c: Context, job: vs.Job, renderer: Renderer) -> None:
        self.stub = admin_grpc.AdminStub(c.channel)
        self.vagrant = vs_grpc.VagrantStub(c.channel)
        self.job = job
        self.job_id = job.id
        self.told_no_runner = False
        self.renderer = renderer
        self.queued = threading.Event()
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def update(self, state: int) -> None:
        if state == vs.Job.QUEUED:
            self.queued.set()
        else:
            self.queued.clear()

    def stop(self) -> None:
        self.done.set()

    def _loop(self) -> None:
        while not self.done.wait(0.5):
            if not self.queued.is_set():
                continue
            try:
                where = self.stub.GetQueuePosition(
                    admin.GetQueuePositionRequest(job_id=self.job_id), timeout=5
                )
                spec = vs.Job()
                spec.CopyFrom(self.job)
                spec.ClearField("id")
                check = self.vagrant.ValidateJob(vs.ValidateJobRequest(job=spec), timeout=5)
            except grpc.RpcError:
                continue
            nobody = "" if check.assignable else "; no connected runner can take it"
            if where.blocked_by:
                self.renderer.set_waiting(f"queued, blocked by job {where.blocked_by}{nobody}")
            elif where.position:
                self.renderer.set_waiting(f"queued, position {where.position}{nobody}")
            if nobody and not self.told_no_runner and self.renderer.spinner is None:
                err.print(
                    "waiting: no connected runner can take this job (start one with "
                    "`waystation runner`)"
                )
                self.told_no_runner = True


@app.command("list")
def list_jobs(
    ctx: typer.Context,
    state: Annotated[str, typer.Option("--state", help="Only jobs in this state.")] = "",
    as_json: Json = False,
) -> None:
    """List jobs, oldest first."""
    c, stub = _stubs(ctx)
    wanted = state.upper()
    if wanted and wanted not in vs.Job.State.keys():  # noqa: SIM118 - a protobuf enum wrapper
        fail(f"--state must be one of {', '.join(vs.Job.State.keys()[1:])}")
    with _progress("loading jobs..."):
        jobs = list(call(c, stub._ListJobs, vs.ListJobsRequest()).jobs)
    if wanted:
        jobs = [j for j in jobs if vs.Job.State.Name(j.state) == wanted]
    if as_json:
        return print_json(jobs)
    print_table(["id", "state", "operation", "scope", "runner", "queued"], rows(jobs), "no jobs")


def _progress(text: str) -> Progress:
    """A spinner on a terminal; nothing at all in a pipe."""
    progress = Progress(
        SpinnerColumn(), TextColumn(text), console=err, transient=True, disable=not err.is_terminal
    )
    progress.add_task(text)
    return progress


@app.command("get")
def get(ctx: typer.Context, job_id: str, as_json: Json = False) -> None:
    """Show one job."""
    c, stub = _stubs(ctx)
    job = call(c, stub.GetJob, vs.GetJobRequest(job_id=job_id), about=f"job {job_id!r}")
    if as_json:
        return print_json(job)
    print_table(["id", "state", "operation", "scope", "runner", "queued"], rows([job]), "")
    if job.HasField("error"):
        out.print(f"error: {job.error.message}", markup=False)


@app.command("cancel")
def cancel(ctx: typer.Context, job_id: str) -> None:
    """Cancel a job; cancelling one already cancelling forces it."""
    c, stub = _stubs(ctx)
    before = call(c, stub.GetJob, vs.GetJobRequest(job_id=job_id), about=f"job {job_id!r}")
    if before.state in (vs.Job.SUCCESS, vs.Job.ERROR):
        out.print(f"job {job_id} had already finished: {_state_word(before)}", markup=False)
        return
    call(c, stub.CancelJob, vs.CancelJobRequest(job_id=job_id))
    job = call(c, stub.GetJob, vs.GetJobRequest(job_id=job_id))
    if job.state not in (vs.Job.SUCCESS, vs.Job.ERROR):
        # A job a runner holds is asked to stop; it ends when the runner says so.
        again = "" if before.HasField("cancel_time") else " (cancel again to force it)"
        out.print(f"job {job_id}: cancel requested{again}", markup=False)
    elif job.state == vs.Job.ERROR and job.HasField("cancel_time"):
        forced = " (forced)" if before.HasField("cancel_time") else ""
        out.print(f"job {job_id}: cancelled{forced}", markup=False)
    else:  # it finished on its own meanwhile
        out.print(f"job {job_id} had already finished: {_state_word(job)}", markup=False)


def _state_word(job: vs.Job) -> str:
    return state_text(job).lower()


@app.command("validate")
def validate(
    ctx: typer.Context,
    command: Annotated[str | None, typer.Argument(help="The command, e.g. up.")] = None,
    target: TargetOpt = "",
    project: ProjectOpt = "",
    basis: BasisOpt = "",
    runner: RunnerOpt = "",
    operation: Annotated[str, typer.Option("--op", help="Operation.")] = "command",
) -> None:
    """Check a job without queueing it: is it valid, and could a runner take it?"""
    c, stub = _stubs(ctx)
    job = _build(_scope(ctx, target, project, basis, False), operation, command, [], runner)
    result = call(c, stub.ValidateJob, vs.ValidateJobRequest(job=job))
    if not result.valid:
        fail(f"invalid job: {result.validation_error.message}")
    note = "a runner can take it now" if result.assignable else "no connected runner can take it"
    out.print(f"valid; {note}", markup=False)


@app.command("prune")
def prune(ctx: typer.Context) -> None:
    """Delete old finished jobs (the server keeps the newest 50)."""
    c, stub = _stubs(ctx)
    before = len(call(c, stub._ListJobs, vs.ListJobsRequest()).jobs)
    with _progress("pruning..."):
        call(c, stub.PruneOldJobs, Empty(), timeout=600)
    after = len(call(c, stub._ListJobs, vs.ListJobsRequest()).jobs)
    out.print(f"pruned {before - after} jobs; {after} left", markup=False)
