"""`waystation basis|project|target|box list|get|upsert|delete`."""

from __future__ import annotations

from typing import Annotated

import typer
from google.protobuf.empty_pb2 import Empty

from waystation.cli.output import (
    Context,
    call,
    fail,
    parse_pairs,
    print_json,
    print_record,
    print_table,
)
from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.waystation.v1 import admin_pb2 as admin
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc

Json = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]
Meta = Annotated[
    list[str] | None, typer.Option("--meta", "-m", help="Metadata KEY=VALUE (repeatable).")
]

basis_app = typer.Typer(help="Bases: the top of the tree (a VAGRANT_HOME).", no_args_is_help=True)
project_app = typer.Typer(help="Projects: a Vagrantfile's directory.", no_args_is_help=True)
target_app = typer.Typer(help="Targets: the machines of a project.", no_args_is_help=True)
box_app = typer.Typer(
    help="Boxes: base images by name, version and provider.", no_args_is_help=True
)
apps = {"basis": basis_app, "project": project_app, "target": target_app, "box": box_app}


def _vagrant(ctx: typer.Context) -> tuple[Context, vs_grpc.VagrantStub]:
    c: Context = ctx.obj
    return c, vs_grpc.VagrantStub(c.channel)


def _show(message: vs.Basis | vs.Project | vs.Target | vs.Box, as_json: bool) -> None:
    print_json(message) if as_json else print_record(message)


def _metadata(pairs: list[str] | None) -> sdk.Args.MetadataSet | None:
    return sdk.Args.MetadataSet(metadata=parse_pairs(pairs, "--meta")) if pairs else None


# -- basis -----------------------------------------------------------------------


def _find_basis(ctx: typer.Context, ref: str) -> vs.Basis:
    c, stub = _vagrant(ctx)
    query = vs.Basis(resource_id=ref, name=ref, path=ref)
    return call(c, stub.FindBasis, vs.FindBasisRequest(basis=query)).basis


@basis_app.command("list")
def basis_list(ctx: typer.Context, as_json: Json = False) -> None:
    """List bases."""
    c, stub = _vagrant(ctx)
    refs = list(call(c, stub.ListBasis, Empty()).basis)
    if as_json:
        return print_json(refs)
    print_table(["name", "id"], [[r.name, r.resource_id] for r in refs], "no bases")


@basis_app.command("get")
def basis_get(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Name, path or id.")],
    as_json: Json = False,
) -> None:
    """Show one basis."""
    _show(_find_basis(ctx, ref), as_json)


@basis_app.command("upsert")
def basis_upsert(
    ctx: typer.Context,
    name: str,
    path: Annotated[str, typer.Option("--path", help="Its directory.")],
    meta: Meta = None,
    as_json: Json = False,
) -> None:
    """Create a basis, or update the one of that name."""
    c, stub = _vagrant(ctx)
    basis = vs.Basis(name=name, path=path, metadata=_metadata(meta))
    existing = call(c, stub.ListBasis, Empty()).basis
    basis.resource_id = next(
        (r.resource_id for r in existing if r.name.lower() == name.lower()), ""
    )
    _show(call(c, stub.UpsertBasis, vs.UpsertBasisRequest(basis=basis)).basis, as_json)


@basis_app.command("delete")
def basis_delete(
    ctx: typer.Context, ref: Annotated[str, typer.Argument(help="Name, path or id.")]
) -> None:
    """Delete a basis with its projects and targets."""
    basis = _find_basis(ctx, ref)
    c: Context = ctx.obj
    stub = admin_grpc.AdminStub(c.channel)
    request = admin.DeleteBasisRequest(basis=sdk.Ref.Basis(resource_id=basis.resource_id))
    call(c, stub.DeleteBasis, request)
    typer.echo(f"deleted basis {basis.name} ({basis.resource_id})")


# -- project ---------------------------------------------------------------------

BasisOpt = Annotated[str, typer.Option("--basis", "-b", help="Its basis: name, path or id.")]


def _find_project(ctx: typer.Context, ref: str, basis: str) -> vs.Project:
    c, stub = _vagrant(ctx)
    query = vs.Project(resource_id=ref, name=ref, path=ref)
    if basis:
        query.basis.CopyFrom(sdk.Ref.Basis(resource_id=basis, name=basis, path=basis))
    return call(c, stub.FindProject, vs.FindProjectRequest(project=query)).project


@project_app.command("list")
def project_list(ctx: typer.Context, as_json: Json = False) -> None:
    """List projects."""
    c, stub = _vagrant(ctx)
    refs = list(call(c, stub.ListProjects, Empty()).projects)
    if as_json:
        return print_json(refs)
    rows = [[r.name, r.basis.name, r.path, r.resource_id] for r in refs]
    print_table(["name", "basis", "path", "id"], rows, "no projects")


@project_app.command("get")
def project_get(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Name, path or id.")],
    basis: BasisOpt = "",
    as_json: Json = False,
) -> None:
    """Show one project."""
    _show(_find_project(ctx, ref, basis), as_json)


@project_app.command("upsert")
def project_upsert(
    ctx: typer.Context,
    name: str,
    basis: BasisOpt,
    path: Annotated[str, typer.Option("--path", help="Its directory.")],
    meta: Meta = None,
    as_json: Json = False,
) -> None:
    """Create a project in a basis, or update the one of that name there."""
    c, stub = _vagrant(ctx)
    parent = _find_basis(ctx, basis)
    project = vs.Project(
        name=name,
        path=path,
        basis=sdk.Ref.Basis(resource_id=parent.resource_id),
        metadata=_metadata(meta),
    )
    project.resource_id = next(
        (p.resource_id for p in parent.projects if p.name.lower() == name.lower()), ""
    )
    _show(call(c, stub.UpsertProject, vs.UpsertProjectRequest(project=project)).project, as_json)


@project_app.command("delete")
def project_delete(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Name, path or id.")],
    basis: BasisOpt = "",
) -> None:
    """Delete a project with its targets."""
    project = _find_project(ctx, ref, basis)
    c: Context = ctx.obj
    request = admin.DeleteProjectRequest(project=sdk.Ref.Project(resource_id=project.resource_id))
    call(c, admin_grpc.AdminStub(c.channel).DeleteProject, request)
    typer.echo(f"deleted project {project.name} ({project.resource_id})")


# -- target ----------------------------------------------------------------------

ProjectOpt = Annotated[str, typer.Option("--project", "-p", help="Its project: name, path or id.")]
STATES = [v.name for v in vs.Operation.PhysicalState.DESCRIPTOR.values if v.number]


ProjectBasisOpt = Annotated[
    str, typer.Option("--basis", "-b", help="The project's basis, when its name is ambiguous.")
]


def _project_ref(ctx: typer.Context, project: str, basis: str = "") -> sdk.Ref.Project:
    found = _find_project(ctx, project, basis)
    return sdk.Ref.Project(resource_id=found.resource_id)


@target_app.command("list")
def target_list(
    ctx: typer.Context,
    project: Annotated[str, typer.Option("--project", "-p", help="Only this project's.")] = "",
    basis: ProjectBasisOpt = "",
    as_json: Json = False,
) -> None:
    """List targets."""
    c, stub = _vagrant(ctx)
    refs = list(call(c, stub.ListTargets, Empty()).targets)
    if project:
        wanted = _project_ref(ctx, project, basis).resource_id
        refs = [r for r in refs if r.project.resource_id == wanted]
    if as_json:
        return print_json(refs)
    rows = [[r.name, r.project.name, r.resource_id] for r in refs]
    print_table(["name", "project", "id"], rows, "no targets")


@target_app.command("get")
def target_get(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Name, uuid or id.")],
    project: ProjectOpt = "",
    basis: ProjectBasisOpt = "",
    as_json: Json = False,
) -> None:
    """Show one target."""
    c, stub = _vagrant(ctx)
    query = vs.Target(resource_id=ref, uuid=ref)
    if project:
        query.name = ref
        query.project.CopyFrom(_project_ref(ctx, project, basis))
    else:  # a bare name: fine while only one project has a target of that name
        named = [
            r for r in call(c, stub.ListTargets, Empty()).targets if r.name.lower() == ref.lower()
        ]
        if len(named) > 1:
            fail(f"target {ref!r} exists in several projects: give --project")
        if named:
            query = vs.Target(resource_id=named[0].resource_id)
    _show(call(c, stub.FindTarget, vs.FindTargetRequest(target=query)).target, as_json)


@target_app.command("upsert")
def target_upsert(
    ctx: typer.Context,
    name: str,
    project: ProjectOpt,
    state: Annotated[
        str | None, typer.Option("--state", help=f"Physical state: {', '.join(STATES)}.")
    ] = None,
    provider: Annotated[str, typer.Option("--provider", help="Provider name.")] = "",
    meta: Meta = None,
    basis: ProjectBasisOpt = "",
    as_json: Json = False,
) -> None:
    """Create a target in a project, or update the one of that name there."""
    c, stub = _vagrant(ctx)
    target = vs.Target(name=name, provider=provider, metadata=_metadata(meta))
    if state is not None:
        if state.upper() not in STATES:
            fail(f"--state must be one of {', '.join(STATES)}, got {state!r}")
        target.state = vs.Operation.PhysicalState.Value(state.upper())
    request = vs.UpsertTargetRequest(project=_project_ref(ctx, project, basis), target=target)
    _show(call(c, stub.UpsertTarget, request).target, as_json)


@target_app.command("delete")
def target_delete(
    ctx: typer.Context,
    ref: Annotated[str, typer.Argument(help="Name or id.")],
    project: ProjectOpt,
    basis: ProjectBasisOpt = "",
) -> None:
    """Delete a target."""
    c, stub = _vagrant(ctx)
    project_ref = _project_ref(ctx, project, basis)
    target_ref = sdk.Ref.Target(resource_id=ref, name=ref)
    found = call(c, stub.GetTarget, vs.GetTargetRequest(project=project_ref, target=target_ref))
    exact = sdk.Ref.Target(resource_id=found.target.resource_id)
    call(c, stub.DeleteTarget, vs.DeleteTargetRequest(project=project_ref, target=exact))
    typer.echo(f"deleted target {found.target.name} ({found.target.resource_id})")


# -- box -------------------------------------------------------------------------

Provider = Annotated[str, typer.Option("--provider", help="Provider, e.g. virtualbox.")]


@box_app.command("list")
def box_list(ctx: typer.Context, as_json: Json = False) -> None:
    """List boxes."""
    c, stub = _vagrant(ctx)
    refs = list(call(c, stub.ListBoxes, Empty()).boxes)
    if as_json:
        return print_json(refs)
    rows = [[r.name, r.version, r.provider, r.resource_id] for r in refs]
    print_table(["name", "version", "provider", "id"], rows, "no boxes")


@box_app.command("get")
def box_get(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Box name, or its id with --id.")],
    version: Annotated[
        str, typer.Option("--version", help="Version constraint, e.g. '>= 1.0, < 2' or '~> 1.2'.")
    ] = "",
    provider: Provider = "",
    by_id: Annotated[bool, typer.Option("--id", help="NAME is a resource id.")] = False,
    as_json: Json = False,
) -> None:
    """Show the highest version of a box that matches, or one box by id."""
    c, stub = _vagrant(ctx)
    if by_id:
        request = vs.GetBoxRequest(box=sdk.Ref.Box(resource_id=name))
        return _show(call(c, stub.GetBox, request).box, as_json)
    ref = sdk.Ref.Box(name=name, version=version, provider=provider)
    found = call(c, stub.FindBox, vs.FindBoxRequest(box=ref))
    if not found.HasField("box"):
        where = f" for provider {provider!r}" if provider else ""
        fail(f"no box {name!r} matches version {version or 'any'!r}{where}")
    _show(found.box, as_json)


@box_app.command("upsert")
def box_upsert(
    ctx: typer.Context,
    name: str,
    version: Annotated[str, typer.Option("--version", help="Exact version, e.g. 1.2.0.")],
    provider: Annotated[str, typer.Option("--provider", help="Provider, e.g. virtualbox.")],
    directory: Annotated[str, typer.Option("--directory", help="Where the box is on disk.")],
    metadata_url: Annotated[str, typer.Option("--metadata-url", help="Its catalog URL.")] = "",
    resource_id: Annotated[str, typer.Option("--id", help="Key to store it under.")] = "",
    as_json: Json = False,
) -> None:
    """Record a box."""
    c, stub = _vagrant(ctx)
    box = vs.Box(
        resource_id=resource_id,
        name=name,
        version=version,
        provider=provider,
        directory=directory,
        metadata_url=metadata_url,
    )
    _show(call(c, stub.UpsertBox, vs.UpsertBoxRequest(box=box)).box, as_json)


@box_app.command("delete")
def box_delete(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Box name, or its id with --id.")],
    version: Annotated[str, typer.Option("--version", help="Exact version.")] = "",
    provider: Provider = "",
    by_id: Annotated[bool, typer.Option("--id", help="NAME is a resource id.")] = False,
) -> None:
    """Delete a box."""
    c, stub = _vagrant(ctx)
    ref = (
        sdk.Ref.Box(resource_id=name)
        if by_id
        else sdk.Ref.Box(name=name, version=version, provider=provider)
    )
    found = call(c, stub.GetBox, vs.GetBoxRequest(box=ref)).box
    call(c, stub.DeleteBox, vs.DeleteBoxRequest(box=sdk.Ref.Box(resource_id=found.resource_id)))
    typer.echo(f"deleted box {found.name} {found.version} {found.provider}")
