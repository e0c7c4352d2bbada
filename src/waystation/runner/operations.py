"""Running one job's operation on a runner: Noop, Validate, Init, Docs, Auth, Command."""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.rpc import code_pb2, status_pb2

from waystation.errors import WaystationError
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.runner import vagrantfile
from waystation.runner.datasource import checkout
from waystation.runner.plugins import CommandContext, Plugin, command_info, find_command
from waystation.runner.ui import UI

Result = vs.Job.Result


class JobFailed(Exception):
    """The operation failed; `status` is what the runner reports."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.status = status_pb2.Status(code=code, message=message)


@dataclass
class Runtime:
    plugins: list[Plugin]
    data_root: Path  # the runner's data directory
    env: Mapping[str, str]  # config variables
    server: Any  # VagrantAsyncStub


def scope_dir(job: vs.Job, root: Path) -> Path:
    """A directory per scope, kept between jobs (machines keep their state here)."""
    kind = job.WhichOneof("scope")
    if kind is None and job.WhichOneof("operation") == "command":
        kind = job.command.WhichOneof("scope")
        ref = getattr(job.command, kind) if kind else None
    else:
        ref = getattr(job, kind) if kind else None
    key = (ref.resource_id or ref.name) if ref is not None else ""
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in key) or "default"
    return root / "scopes" / (kind or "none") / safe


async def execute(job: vs.Job, ui: UI, runtime: Runtime, cancelled: asyncio.Event) -> Result:
    operation = job.WhichOneof("operation")
    if operation == "noop":
        return Result()
    if operation == "init":
        return Result(init=_init(runtime.plugins))
    if operation == "docs":
        return Result(docs=_docs(runtime.plugins))
    if operation == "auth":
        return Result(auth=await _auth(job.auth, runtime.plugins))
    data_dir = scope_dir(job, runtime.data_root)
    try:
        async with checkout(job, data_dir) as work_dir:
            if operation == "validate":
                _validate(job, work_dir, ui)
                return Result(validate=vs.Job.ValidateResult())
            if operation == "command":
                return Result(run=await _command(job, ui, runtime, data_dir, work_dir, cancelled))
    except WaystationError as exc:
        raise JobFailed(code_pb2.FAILED_PRECONDITION, exc.message) from None
    raise JobFailed(code_pb2.UNIMPLEMENTED, f"operation {operation!r} is not supported")


def _validate(job: vs.Job, work_dir: Path, ui: UI) -> None:
    found = vagrantfile.find(job, work_dir)
    if found is None:
        raise JobFailed(code_pb2.NOT_FOUND, "no Vagrantfile.json or Vagrantfile.hcl to validate")
    raw, fmt, source = found
    config = vagrantfile.parse(raw, fmt, source)
    ui.line(f"{source} is valid ({len(config)} top-level settings)", color="green")


async def _command(
    job: vs.Job, ui: UI, runtime: Runtime, data_dir: Path, work_dir: Path, cancelled: asyncio.Event
) -> vs.Job.CommandResult:
    op = job.command
    if op.vagrantfile.raw:  # a command never runs on a Vagrantfile that does not parse
        vf = op.vagrantfile
        vagrantfile.parse(vf.raw, vf.format, vf.path.path or "Vagrantfile")
    command = find_command(runtime.plugins, op.command)
    if command is None:
        raise JobFailed(
            code_pb2.NOT_FOUND, f"no plugin on this runner has a command {op.command!r}"
        )
    flags: dict[str, str | bool] = {}
    for flag in op.cli_args.flags:
        flags[flag.name] = flag.bool if flag.WhichOneof("value") == "bool" else flag.string
    ctx = CommandContext(
        job=job,
        args=list(op.cli_args.args),
        flags=flags,
        ui=ui,
        data_dir=data_dir,
        work_dir=work_dir,
        env=runtime.env,
        cancelled=cancelled,
        server=runtime.server,
    )
    exit_code = await command.run(ctx)
    if cancelled.is_set():
        raise JobFailed(code_pb2.CANCELLED, "canceled")
    result = vs.Job.CommandResult(run_result=exit_code == 0, exit_code=exit_code)
    if exit_code != 0:
        result.run_error.CopyFrom(
            status_pb2.Status(
                code=code_pb2.UNKNOWN, message=f"{op.command} exited with {exit_code}"
            )
        )
    return result


def _init(plugins: list[Plugin]) -> vs.Job.InitResult:
    result = vs.Job.InitResult()
    for plugin in plugins:
        result.commands.extend(command_info(c) for c in plugin.commands)
        result.actions.extend(
            vs.Job.Action(name=a.name, source=plugin.name) for a in plugin.actions
        )
        for hook in plugin.hooks:
            result.hooks.add(
                target_action_name=hook.target_action,
                action_name=hook.action,
                location=vs.Job.Hook.AFTER if hook.after else vs.Job.Hook.BEFORE,
                source=plugin.name,
            )
    return result


def _docs(plugins: list[Plugin]) -> vs.Job.DocsResult:
    result = vs.Job.DocsResult()
    for plugin in plugins:
        if plugin.docs is None:
            continue
        docs = vs.Documentation(description=plugin.docs.description, example=plugin.docs.example)
        for name, synopsis in plugin.docs.fields.items():
            docs.fields[name].CopyFrom(vs.Documentation.Field(name=name, synopsis=synopsis))
        component = vs.Component(type=plugin.component, name=plugin.name)  # type: ignore[arg-type]
        result.results.add(component=component, docs=docs)
    return result


async def _auth(op: vs.Job.AuthOp, plugins: list[Plugin]) -> vs.Job.AuthResult:
    result = vs.Job.AuthResult()
    wanted = op.component.name if op.HasField("component") else ""
    if wanted and wanted not in {p.name for p in plugins}:
        raise JobFailed(code_pb2.NOT_FOUND, f"no plugin {wanted!r} on this runner to authenticate")
    for plugin in plugins:
        if wanted and plugin.name != wanted:
            continue
        component = vs.Component(type=plugin.component, name=plugin.name)  # type: ignore[arg-type]
        entry = result.results.add(component=component)
        if plugin.auth is None:
            entry.check_result = op.check_only  # nothing to authenticate: the check passes
            continue
        entry.auth_supported = True
        outcome = await plugin.auth(op.check_only)
        error = status_pb2.Status(code=code_pb2.UNAUTHENTICATED, message=outcome.message)
        if op.check_only:
            entry.check_result = outcome.ok
            if not outcome.ok:
                entry.check_error.CopyFrom(error)
        else:
            entry.auth_completed = outcome.ok
            if not outcome.ok:
                entry.auth_error.CopyFrom(error)
    return result
