"""`waystation`: the command line for people. Parses arguments, calls the server."""

from __future__ import annotations

from typing import Annotated

import typer

from waystation import __version__
from waystation.cli import jobs, runner, server, state
from waystation.cli.output import Context
from waystation.config import DEFAULT_ADDRESS

app = typer.Typer(
    name="waystation",
    help="Waystation: a control plane for provisioning jobs.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(server.app, name="server")
app.add_typer(runner.app, name="runner")
app.add_typer(jobs.app, name="job")
app.command("run", context_settings={"allow_extra_args": True, "ignore_unknown_options": True})(
    jobs.run
)
for name, sub in state.apps.items():
    app.add_typer(sub, name=name)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"waystation {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    address: Annotated[
        str,
        typer.Option(
            "--address", "-a", envvar="WAYSTATION_ADDR", help="The server to talk to, HOST:PORT."
        ),
    ] = DEFAULT_ADDRESS,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Waystation: a control plane for provisioning jobs."""
    ctx.obj = Context(address=address)


if __name__ == "__main__":
    app()
