"""The built-in plugin: `exec`, and a `local` provider whose machines are processes.

`up` starts one long-lived local process per target as its "machine",
`halt` stops it, `destroy` stops it and forgets it, `status` shows it; each
writes the target's state (CREATED, HALTED, DESTROYED) back to the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import sys
from pathlib import Path
from typing import Any

from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.runner.plugins import Command, CommandContext, Documentation, Flag, Plugin

# Seconds a process gets to stop after SIGTERM before SIGKILL.
STOP_GRACE = 10.0
# Seconds the output of a finished command may still drain (from children it left).
DRAIN_GRACE = 1.0
PUMP_CHUNK = 65536
# The machine itself: a process that idles until it is told to stop.
MACHINE = (
    "import signal, sys, time\n"
    "signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))\n"
    "while True: time.sleep(3600)\n"
)


async def exec_command(ctx: CommandContext) -> int:
    """Run a command in the scope's directory, streaming its output."""
    if not ctx.args:
        ctx.ui.line("exec needs a command to run", color="red")
        return 2
    argv = ["/bin/sh", "-c", ctx.args[0]] if len(ctx.args) == 1 else ctx.args
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=ctx.work_dir,
        env={**os.environ, **ctx.env},
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group, so a cancel reaches children
    )
    assert proc.stdout is not None and proc.stderr is not None
    pumps = [
        asyncio.ensure_future(_pump(proc.stdout, ctx, stderr=False)),
        asyncio.ensure_future(_pump(proc.stderr, ctx, stderr=True)),
    ]
    cancelled = asyncio.ensure_future(ctx.cancelled.wait())
    exited = asyncio.ensure_future(_exit(proc))
    try:
        await asyncio.wait({cancelled, exited}, return_when=asyncio.FIRST_COMPLETED)
        if not exited.done():
            ctx.ui.line("cancelling: stopping the command", color="yellow")
            await _stop_group(proc)
        # Children it left behind may hold its output open: drain briefly, then stop them.
        _, still = await asyncio.wait(pumps, timeout=DRAIN_GRACE)
        if still:
            await _stop_group(proc)
            await asyncio.wait(pumps, timeout=DRAIN_GRACE)
        return proc.returncode if proc.returncode is not None else -1
    finally:
        cancelled.cancel()
        exited.cancel()
        _signal_group(proc.pid, signal.SIGKILL)  # a forced cancel, or leftovers: no grace
        await _exit(proc)
        for pump in pumps:
            pump.cancel()


async def _exit(proc: asyncio.subprocess.Process) -> int:
    """The command's exit status, once it has exited. Not `proc.wait()`: on
    Python 3.11 that also waits for its output pipes to close, which a child
    left in the background holds open for as long as it lives."""
    while proc.returncode is None:  # noqa: ASYNC110 - set by the loop's child watcher
        await asyncio.sleep(0.05)
    return proc.returncode


async def _pump(stream: asyncio.StreamReader, ctx: CommandContext, *, stderr: bool) -> None:
    # Chunks, not lines: a line may be longer than any buffer.
    while chunk := await stream.read(PUMP_CHUNK):
        ctx.ui.raw(chunk, stderr=stderr)


def _signal_group(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


async def _stop_group(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM the command's process group; SIGKILL what is left after the grace."""
    _signal_group(proc.pid, signal.SIGTERM)
    try:
        async with asyncio.timeout(STOP_GRACE):
            await _exit(proc)
            while _group_alive(proc.pid):  # noqa: ASYNC110 - no event for a group's end
                await asyncio.sleep(0.05)
    except TimeoutError:
        _signal_group(proc.pid, signal.SIGKILL)
        await _exit(proc)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    return True


# -- the local provider ------------------------------------------------------------


def _state_file(ctx: CommandContext) -> Path:
    return ctx.data_dir / "machine.json"


def _running_pid(ctx: CommandContext) -> int | None:
    try:
        pid = int(json.loads(_state_file(ctx).read_text())["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        return pid
    # A zombie (exited, unreaped) is not a running machine.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split()[2] == "Z":
            return None
    return pid


async def _target(ctx: CommandContext) -> vs.Target:
    ref = ctx.job.target if ctx.job.WhichOneof("scope") == "target" else ctx.job.command.target
    server: Any = ctx.server
    found = await server.FindTarget(
        vs.FindTargetRequest(
            target=vs.Target(resource_id=ref.resource_id, name=ref.name, project=ref.project)
        )
    )
    return found.target  # type: ignore[no-any-return]


async def _set_state(ctx: CommandContext, target: vs.Target, state: int) -> None:
    target.state = state  # type: ignore[assignment]
    target.provider = "local"
    server: Any = ctx.server
    project = sdk.Ref.Project(resource_id=target.project.resource_id)
    await server.UpsertTarget(vs.UpsertTargetRequest(project=project, target=target))


async def up(ctx: CommandContext) -> int:
    target = await _target(ctx)
    step = ctx.ui.step(f"Bringing machine '{target.name}' up with the 'local' provider...")
    pid = _running_pid(ctx)
    if pid is not None:
        ctx.ui.step_done(step, f"Machine '{target.name}' is already running (pid {pid}).")
    else:
        ctx.data_dir.mkdir(parents=True, exist_ok=True)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            MACHINE,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.DEVNULL,
            start_new_session=True,  # outlives the runner's job, as a machine would
        )
        _state_file(ctx).write_text(json.dumps({"pid": proc.pid}))
        ctx.ui.step_done(step, f"Machine '{target.name}' booted and ready (pid {proc.pid}).")
    await _set_state(ctx, target, vs.Operation.CREATED)
    ctx.ui.line(f"==> {target.name}: state is now created", color="green")
    return 0


async def halt(ctx: CommandContext) -> int:
    target = await _target(ctx)
    step = ctx.ui.step(f"Attempting graceful shutdown of machine '{target.name}'...")
    await _stop_machine(ctx)
    ctx.ui.step_done(step, f"Machine '{target.name}' halted.")
    await _set_state(ctx, target, vs.Operation.HALTED)
    return 0


async def destroy(ctx: CommandContext) -> int:
    target = await _target(ctx)
    step = ctx.ui.step(f"Destroying machine '{target.name}'...")
    await _stop_machine(ctx)
    shutil.rmtree(ctx.data_dir, ignore_errors=True)
    ctx.ui.step_done(step, f"Machine '{target.name}' destroyed.")
    await _set_state(ctx, target, vs.Operation.DESTROYED)
    return 0


async def status(ctx: CommandContext) -> int:
    target = await _target(ctx)
    pid = _running_pid(ctx)
    state = "running" if pid is not None else vs.Operation.PhysicalState.Name(target.state).lower()
    ctx.ui.table(
        ["name", "state", "provider", "pid"], [[target.name, state, "local", str(pid or "")]]
    )
    return 0


async def _stop_machine(ctx: CommandContext) -> None:
    pid = _running_pid(ctx)
    if pid is None:
        return
    _signal_group(pid, signal.SIGTERM)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STOP_GRACE
    while _running_pid(ctx) is not None and loop.time() < deadline:  # noqa: ASYNC110 - not our child
        await asyncio.sleep(0.05)
    if _running_pid(ctx) is not None:
        _signal_group(pid, signal.SIGKILL)
    _state_file(ctx).unlink(missing_ok=True)


plugin = Plugin(
    name="builtin",
    commands=(
        Command(
            "exec",
            "Run a shell command in the scope's directory",
            exec_command,
            help="exec COMMAND... runs one shell line, or an argv when given several words.",
        ),
        Command("up", "Start the target's machine", up),
        Command("halt", "Stop the target's machine", halt),
        Command(
            "destroy",
            "Stop and delete the target's machine",
            destroy,
            flags=(Flag("force", "Do not ask for confirmation", short_name="f", type="bool"),),
        ),
        Command("status", "Show the state of the target's machine", status),
    ),
    docs=Documentation(
        description="Built-in commands, and a 'local' provider whose machines are processes.",
        example="waystation run up --target web",
    ),
)
