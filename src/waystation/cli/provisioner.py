"""`waystation provisioner`: run a provisioner daemon, or look at daemons and their jobs."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from waystation.cli.output import (
    Context,
    call,
    configure_logging,
    fail,
    out,
    parse_pairs,
    print_json,
    print_table,
    rpc_errors,
)
from waystation.cli.provisioning import (
    Job,
    Json,
    cancel_job,
    exit_for,
    failure_text,
    pending_text,
    status_text,
    stub,
    watch,
)
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv

provisioner_app = typer.Typer(
    help="Run a provisioner daemon (with no subcommand), or look at daemons and their jobs.",
    invoke_without_command=True,
)
jobs_app = typer.Typer(help="Provisioner jobs: pending, running and done.")
provisioner_app.add_typer(jobs_app, name="jobs")


@provisioner_app.callback()
def daemon(
    ctx: typer.Context,
    provisioners: Annotated[
        list[str] | None,
        typer.Option("--provisioner", help="A provisioner to serve (repeat). [default: echo]"),
    ] = None,
    tags: Annotated[
        list[str] | None, typer.Option("--tag", help="Tag KEY=VALUE this daemon has (repeat).")
    ] = None,
    daemon_id: Annotated[
        str, typer.Option("--id", help="Daemon id. [default: host name + a random suffix]")
    ] = "",
    work_dir: Annotated[
        Path | None, typer.Option("--work-dir", help="Where jobs unpack templates.")
    ] = None,
    cancel_grace: Annotated[
        float, typer.Option("--cancel-grace", min=0, help="Seconds a cancelled job may take.")
    ] = 60.0,
    max_jobs: Annotated[
        int | None, typer.Option("--max-jobs", min=1, help="Exit after this many jobs.")
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, ...")] = "info",
) -> None:
    """Take provisioner jobs from the server and run them, until interrupted.

    First SIGINT/SIGTERM: take no more jobs and finish the one in hand;
    a second one cancels it.
    """
    if ctx.invoked_subcommand is not None:
        return
    from waystation.provisioner.base import load
    from waystation.provisioner.daemon import DaemonSettings
    from waystation.provisioner.run import default_daemon_id, run

    configure_logging(log_level)
    names = provisioners or ["echo"]
    try:
        loaded = load(names)
    except KeyError as exc:
        fail(str(exc.args[0]))
    c: Context = ctx.obj
    settings = DaemonSettings(
        address=c.address,
        token=c.connection.token,
        tls=c.connection.tls,
        tls_ca=c.connection.tls_ca,
        tls_skip_verify=c.connection.tls_skip_verify,
        daemon_id=daemon_id or default_daemon_id(),
        provisioners=names,
        tags=parse_pairs(tags or [], "--tag"),
        work_dir=work_dir,
        cancel_grace=cancel_grace,
        max_jobs=max_jobs,
    )
    with rpc_errors(c, "provisioner daemon"):
        run(settings, loaded)


@provisioner_app.command("list")
def daemons_list(ctx: typer.Context, as_json: Json = False) -> None:
    """List provisioner daemons: connected or not, idle or busy."""
    c: Context = ctx.obj
    found = call(c, stub(c).ListProvisionerDaemons, pv.ListProvisionerDaemonsRequest()).daemons
    if as_json:
        return print_json(list(found))
    rows = [
        [
            d.id,
            ",".join(d.provisioners),
            ",".join(f"{k}={v}" for k, v in sorted(d.tags.items())),
            d.last_seen.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
            ("busy: " + d.current_job_id)
            if d.current_job_id
            else ("idle" if d.online else "offline"),
        ]
        for d in found
    ]
    print_table(
        ["id", "provisioners", "tags", "last seen", "status"], rows, "no provisioner daemons"
    )


@jobs_app.command("list")
def jobs_list(
    ctx: typer.Context,
    include_done: Annotated[bool, typer.Option("--all", help="Include finished jobs.")] = False,
    limit: Annotated[int, typer.Option("--limit", min=1, help="At most this many.")] = 100,
    as_json: Json = False,
) -> None:
    """List provisioner jobs; pending ones with their place in the queue or why they wait."""
    c: Context = ctx.obj
    request = pv.ListProvisionerJobsRequest(pending_only=not include_done, limit=limit)
    found = call(c, stub(c).ListProvisionerJobs, request).jobs
    if as_json:
        return print_json(list(found))
    rows = [
        [
            j.id,
            Job.Type.Name(j.type).lower(),
            j.provisioner,
            ",".join(f"{k}={v}" for k, v in sorted(j.tags.items())),
            Job.Status.Name(j.status).lower(),
            pending_text(j) or j.daemon_id,
            failure_text(j),
        ]
        for j in found
    ]
    empty = "no provisioner jobs" if include_done else "no pending provisioner jobs"
    print_table(["id", "type", "provisioner", "tags", "status", "where", "error"], rows, empty)


@jobs_app.command("show")
def jobs_show(ctx: typer.Context, job_id: str, as_json: Json = False) -> None:
    """Show one provisioner job."""
    c: Context = ctx.obj
    job = call(c, stub(c).GetProvisionerJob, pv.GetProvisionerJobRequest(id=job_id))
    if as_json:
        return print_json(job)
    out.print(Text.assemble(("job ", "bold"), job.id, " ", status_text(job)))
    out.print(f"type: {Job.Type.Name(job.type).lower()}; provisioner: {job.provisioner}")
    for label, value in (
        ("daemon", job.daemon_id),
        ("error", failure_text(job)),
        ("waiting", pending_text(job)),
    ):
        if value:
            out.print(f"{label}: {value}")


@jobs_app.command("watch")
def jobs_watch(ctx: typer.Context, job_id: str) -> None:
    """Follow a job's logs until it ends; exit 1 unless it succeeded."""
    exit_for(watch(ctx.obj, job_id))


@jobs_app.command("cancel")
def jobs_cancel(ctx: typer.Context, job_id: str) -> None:
    """Cancel a job: pending ones end at once, running ones are asked to stop
    (cancel again to end one now)."""
    cancel_job(ctx.obj, job_id)


apps = {"provisioner": provisioner_app}
