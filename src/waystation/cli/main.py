"""`waystation`: the command line for people. Parses arguments, calls the server."""

from __future__ import annotations

import os

# gRPC core logs (e.g. a failed TLS handshake) would add lines to our one-line errors.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

from typing import Annotated

import typer

from waystation import __version__
from waystation.cli import (
    auth,
    jobs,
    provisioner,
    provisioning,
    runner,
    server,
    snapshot,
    state,
    users,
)
from waystation.cli.output import Context, fail
from waystation.client import Connection, Contexts
from waystation.core.settings import DEFAULT_ADDRESS

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
app.add_typer(auth.token_app, name="token")
app.add_typer(users.app, name="user")
app.add_typer(users.audit_app, name="audit")
app.add_typer(auth.context_app, name="context")
app.add_typer(snapshot.app, name="snapshot")
app.command("login")(auth.login)
app.command("logout")(auth.logout)
app.command("whoami")(auth.whoami)
# No extra args nor unknown options: the command's own arguments come after `--`.
app.command("run")(jobs.run)
for name, sub in (*state.apps.items(), *provisioning.apps.items(), *provisioner.apps.items()):
    app.add_typer(sub, name=name)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"waystation {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    ctx: typer.Context,
    address: Annotated[
        str | None,
        typer.Option(
            "--address",
            "-a",
            envvar="WAYSTATION_ADDR",
            help=f"The server, HOST:PORT. [default: the context's, else {DEFAULT_ADDRESS}]",
            show_default=False,
        ),
    ] = None,
    token: Annotated[
        str | None,
        typer.Option("--token", envvar="WAYSTATION_TOKEN", help="Token (default: the context's)."),
    ] = None,
    context: Annotated[
        str | None,
        typer.Option("--context", envvar="WAYSTATION_CONTEXT", help="Use this saved context."),
    ] = None,
    tls: Annotated[bool, typer.Option("--tls", help="Connect with TLS.")] = False,
    tls_ca: Annotated[
        str | None, typer.Option("--tls-ca", help="CA bundle that signed the server's cert.")
    ] = None,
    tls_skip_verify: Annotated[
        bool, typer.Option("--tls-skip-verify", help="TLS, trusting any server certificate.")
    ] = False,
    version: Annotated[
        bool,
        typer.Option(
            "--version", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Waystation: a control plane for provisioning jobs."""
    try:
        saved = Contexts.load()
    except ValueError as exc:
        fail(str(exc))
    name = context or saved.current
    if context and context not in saved.contexts:
        fail(f"no context {context!r}: see `waystation context list`")
    base = saved.contexts.get(name) or Connection()
    connection = Connection(
        address=address or base.address,
        token=token if token is not None else base.token,
        tls=tls or base.tls,
        tls_ca=tls_ca if tls_ca is not None else base.tls_ca,
        tls_skip_verify=tls_skip_verify or base.tls_skip_verify,
    )
    ctx.obj = Context(connection, name)


if __name__ == "__main__":
    app()
