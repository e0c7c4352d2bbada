"""`waystation runner [--id ...]` (the agent) and `waystation runner list|get`."""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from pathlib import Path
from typing import Annotated

import grpc
import platformdirs
import typer
from grpc import aio

from waystation.cli.output import (
    Context,
    call,
    configure_logging,
    fail,
    print_json,
    print_record,
    print_table,
)
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.waystation.v1 import admin_pb2 as admin
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc

app = typer.Typer(
    help="Run a runner (with no subcommand), or look at runners.",
    invoke_without_command=True,
)
Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


@app.callback()
def agent(
    ctx: typer.Context,
    runner_id: Annotated[
        str, typer.Option("--id", help="This runner's id. [default: the host name]")
    ] = "",
    by_id_only: Annotated[
        bool, typer.Option("--by-id-only", help="Take only jobs aimed at this runner's id.")
    ] = False,
    concurrency: Annotated[
        int, typer.Option("--concurrency", "-c", min=1, max=256, help="Jobs at once.")
    ] = 1,
    data_dir: Annotated[
        Path | None,
        typer.Option("--data-dir", envvar="WAYSTATION_RUNNER_DATA_DIR", help="Runner state."),
    ] = None,
    max_jobs: Annotated[
        int | None, typer.Option("--max-jobs", min=1, help="Exit after this many jobs.")
    ] = None,
    log_level: Annotated[str, typer.Option("--log-level", help="debug, info, ...")] = "info",
) -> None:
    """Take jobs from the server and run them, until interrupted."""
    if ctx.invoked_subcommand is not None:
        return
    from waystation.runner.agent import Agent, AgentSettings

    configure_logging(log_level)
    c: Context = ctx.obj
    settings = AgentSettings(
        address=c.address,
        token=c.connection.token,
        tls=c.connection.tls,
        tls_ca=c.connection.tls_ca,
        tls_skip_verify=c.connection.tls_skip_verify,
        runner_id=runner_id or socket.gethostname(),
        data_dir=data_dir or Path(platformdirs.user_data_dir("waystation-runner", appauthor=False)),
        by_id_only=by_id_only,
        concurrency=concurrency,
        max_jobs=max_jobs,
    )

    async def main() -> None:
        agent = Agent(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, agent.stop)
        logging.getLogger("waystation").info(
            "runner %s serving %s (%d at once; %d plugins)",
            settings.runner_id,
            settings.address,
            settings.concurrency,
            len(agent.plugins),
        )
        await agent.run()

    try:
        asyncio.run(main())
    except aio.AioRpcError as exc:
        # The server refused the runner itself (its token, most often): one
        # line and a non-zero exit, not a traceback.
        hint = ""
        if exc.code() == grpc.StatusCode.UNAUTHENTICATED:
            hint = " (log in with `waystation login`, or pass --token)"
        fail(f"the server refused the runner: {exc.details()} ({exc.code().name}){hint}")


@app.command("list")
def list_runners(ctx: typer.Context, as_json: Json = False) -> None:
    """List the runners the server knows."""
    c: Context = ctx.obj
    found = call(c, admin_grpc.AdminStub(c.channel).ListRunners, admin.ListRunnersRequest()).runners
    if as_json:
        return print_json(list(found))
    rows = [
        [
            r.runner.id,
            "online" if r.online else "offline",
            "yes" if r.runner.by_id_only else "no",
            r.last_seen.ToDatetime().strftime("%Y-%m-%d %H:%M:%S"),
        ]
        for r in found
    ]
    print_table(["id", "status", "by id only", "last seen"], rows, "no runners")


@app.command("get")
def get(ctx: typer.Context, runner_id: str, as_json: Json = False) -> None:
    """Show one runner."""
    c: Context = ctx.obj
    stub = vs_grpc.VagrantStub(c.channel)
    runner = call(c, stub.GetRunner, vs.GetRunnerRequest(runner_id=runner_id))
    print_json(runner) if as_json else print_record(runner)
