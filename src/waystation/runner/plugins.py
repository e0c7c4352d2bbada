"""The plugin API of the runner, for third parties as for the built-ins.

A plugin is a `Plugin` value published under the entry-point group
`waystation.plugins`, in the plugin package's pyproject.toml:

    [project.entry-points."waystation.plugins"]
    myplugin = "my_package.module:plugin"

The object named may be a `Plugin` or a function that returns one. A runner
loads every plugin installed beside it at start; `Init` jobs report their
commands, actions and hooks, and `Command` jobs run a command by name.

A command is an async function taking a `CommandContext` and returning an
exit code. It writes to the job's output through `ctx.ui`, finds its files in
`ctx.data_dir`, its config variables in `ctx.env`, and must stop soon after
`ctx.cancelled` is set (a graceful cancel). A forced cancel cancels its task.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs

if TYPE_CHECKING:
    from waystation.runner.ui import UI

log = logging.getLogger(__name__)

GROUP = "waystation.plugins"


@dataclass(frozen=True)
class Flag:
    long_name: str
    description: str = ""
    short_name: str = ""
    default: str = ""
    type: Literal["string", "bool"] = "string"
    aliases: tuple[str, ...] = ()


@dataclass
class CommandContext:
    job: vs.Job
    args: list[str]
    flags: dict[str, str | bool]
    ui: UI
    data_dir: Path  # a directory of its own for the job's scope, kept between jobs
    work_dir: Path  # where the job's data source (local or a git checkout) is
    env: Mapping[str, str]  # the runner's config variables
    cancelled: asyncio.Event
    server: object  # a VagrantAsyncStub for state calls (UpsertTarget, ...)


@dataclass(frozen=True)
class Command:
    name: str
    synopsis: str
    run: Callable[[CommandContext], Awaitable[int]]
    help: str = ""
    flags: tuple[Flag, ...] = ()
    primary: bool = True
    subcommands: tuple[Command, ...] = ()


@dataclass(frozen=True)
class Action:
    name: str


@dataclass(frozen=True)
class Hook:
    target_action: str
    action: str
    after: bool = False


@dataclass(frozen=True)
class Documentation:
    description: str
    example: str = ""
    fields: Mapping[str, str] = field(default_factory=dict)  # field name -> synopsis


@dataclass(frozen=True)
class AuthResult:
    supported: bool
    ok: bool = False
    message: str = ""


@dataclass(frozen=True)
class Plugin:
    name: str
    commands: tuple[Command, ...] = ()
    actions: tuple[Action, ...] = ()
    hooks: tuple[Hook, ...] = ()
    docs: Documentation | None = None
    # The component type the plugin is, for Docs and Auth results.
    component: int = vs.Component.COMMAND
    # Check (check_only=True) or perform authentication; None: not supported.
    auth: Callable[[bool], Awaitable[AuthResult]] | None = None


def load_plugins() -> list[Plugin]:
    """Every installed plugin, by name; a broken one is logged and skipped."""
    found: dict[str, Plugin] = {}
    for entry in entry_points(group=GROUP):
        try:
            value = entry.load()
            plugin = value() if callable(value) and not isinstance(value, Plugin) else value
        except Exception:
            log.exception("plugin %s (%s) failed to load; skipping it", entry.name, entry.value)
            continue
        if not isinstance(plugin, Plugin):
            log.error("plugin %s is not a waystation Plugin; skipping it", entry.name)
            continue
        found[plugin.name] = plugin
    return [found[name] for name in sorted(found)]


def find_command(plugins: list[Plugin], name: str) -> Command | None:
    for plugin in plugins:
        for command in plugin.commands:
            if command.name == name:
                return command
    return None


def command_info(command: Command) -> sdk.Command.CommandInfo:
    return sdk.Command.CommandInfo(
        name=command.name,
        help=command.help,
        synopsis=command.synopsis,
        primary=command.primary,
        flags=[
            sdk.Command.Flag(
                long_name=f.long_name,
                short_name=f.short_name,
                description=f.description,
                default_value=f.default,
                type=sdk.Command.Flag.BOOL if f.type == "bool" else sdk.Command.Flag.STRING,
                aliases=list(f.aliases),
            )
            for f in command.flags
        ],
        subcommands=[command_info(sub) for sub in command.subcommands],
    )
