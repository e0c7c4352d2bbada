"""`waystation` the CLI as people run it: a real process against a real server.

Every test runs `python -m waystation.cli.main ...` as a child process against
`waystation server run`, also a child process. One SQLite server serves the
whole module; one scenario runs on each storage backend. Each CLI run costs
about a second of start-up, so tests make few of them and set up or check
whatever is not under test over gRPC directly.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty

from waystation import __version__
from waystation import testing as t
from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.waystation.v1 import admin_pb2 as admin
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc
from waystation.testing import assert_cli_error, cli_table, show

DOWN = "127.0.0.1:1"  # nothing listens on port 1


# -- harness ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `waystation server run` on SQLite for the whole module."""
    server = t.ServerProcess(tmp_path_factory.mktemp("cli") / "data")
    try:
        yield server.start()
    finally:
        if server.proc is not None and server.proc.poll() is None:
            assert server.stop() == 0, server.output()


def _env(address: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYSTATION_")}
    for noise in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "LINES"):
        env.pop(noise, None)
    env["WAYSTATION_ADDR"] = address
    env["COLUMNS"] = "80"  # what a pipe gets when COLUMNS is unset; fixed for repeatability
    return env


def cli(address: str, command: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run `waystation COMMAND EXTRA...` with WAYSTATION_ADDR=address.

    COMMAND is split like a shell would; EXTRA are passed verbatim (paths, odd names).
    Never raises on the exit status.
    """
    return subprocess.run(
        [sys.executable, "-m", "waystation.cli.main", *shlex.split(command), *extra],
        env=_env(address),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(address: str, command: str, *extra: str) -> str:
    """Run a command that must succeed, with no traceback; return its stdout."""
    result = cli(address, command, *extra)
    assert result.returncode == 0, show(result)
    assert "Traceback" not in result.stderr, show(result)
    return result.stdout


def ok_json(address: str, command: str, *extra: str) -> Any:
    """Run a command with --json that must succeed; return what it printed, parsed."""
    return json.loads(ok(address, command, *extra, "--json"))


class Direct:
    """The same server over gRPC, to set up and check what a test is not about."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.vagrant = vs_grpc.VagrantStub(channel)
        self.admin = admin_grpc.AdminStub(channel)

    def basis(self, name: str, path: str) -> vs.Basis:
        request = vs.UpsertBasisRequest(basis=t.basis(name, path))
        return self.vagrant.UpsertBasis(request, timeout=10).basis

    def project(self, basis: vs.Basis, name: str, path: str) -> vs.Project:
        project = t.project(t.basis_ref(basis), name, path)
        request = vs.UpsertProjectRequest(project=project)
        return self.vagrant.UpsertProject(request, timeout=10).project

    def target(self, project: vs.Project, name: str) -> vs.Target:
        request = vs.UpsertTargetRequest(project=t.project_ref(project), target=t.target(name))
        return self.vagrant.UpsertTarget(request, timeout=10).target

    def delete_basis(self, name: str) -> None:
        """Delete a basis by name if it exists (cleanup after tests that may crash)."""
        for ref in self.vagrant.ListBasis(Empty(), timeout=10).basis:
            if ref.name == name:
                request = admin.DeleteBasisRequest(basis=sdk.Ref.Basis(resource_id=ref.resource_id))
                self.admin.DeleteBasis(request, timeout=10)


@pytest.fixture
def direct(address: str) -> Iterator[Direct]:
    with grpc.insecure_channel(address) as channel:
        yield Direct(channel)


# -- the root command ------------------------------------------------------------


def test_version_and_help(address: str) -> None:
    assert ok(address, "--version").strip() == f"waystation {__version__}"
    root = ok(address, "--help")
    for summary in ("Run the waystation server", "Bases:", "Projects:", "Targets:", "Boxes:"):
        assert summary in root
    basis = ok(address, "basis --help")
    for summary in ("List bases", "Show one basis", "Create a basis", "Delete a basis"):
        assert summary in basis


# -- bases -----------------------------------------------------------------------


def test_basis_upsert_list_get_update_delete(address: str, tmp_path: Path) -> None:
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    made = ok_json(address, "basis upsert cli-home -m k=v --meta x=y --path", one)
    rid = made["resource_id"]
    assert rid and (made["name"], made["path"]) == ("cli-home", one)
    assert made["metadata"] == {"metadata": {"k": "v", "x": "y"}}

    again = ok_json(address, "basis upsert cli-home --path", two)
    assert again["resource_id"] == rid, "upserting the same name made a second basis"
    assert again["path"] == two

    header, rows = cli_table(ok(address, "basis list"))
    assert header == ["NAME", "ID"]
    assert ["cli-home", rid] in rows

    listed = ok_json(address, "basis list")
    assert isinstance(listed, list)
    assert [b for b in listed if b["name"] == "cli-home"] == [
        {"resource_id": rid, "name": "cli-home"}
    ]

    got = ok_json(address, "basis get cli-home")
    assert (got["resource_id"], got["name"], got["path"]) == (rid, "cli-home", two)

    assert ok(address, "basis delete cli-home").strip() == f"deleted basis cli-home ({rid})"
    assert_cli_error(cli(address, "basis get cli-home"), "not found", "'cli-home'")


# -- projects and targets --------------------------------------------------------


def test_project_and_target_lifecycle(address: str, direct: Direct, tmp_path: Path) -> None:
    basis = direct.basis("cli-pt-basis", str(tmp_path / "home"))
    web = "/srv/web"
    project = ok_json(address, "project upsert cli-pt-web --basis cli-pt-basis --path", web)
    pid = project["resource_id"]
    assert project["basis"]["resource_id"] == basis.resource_id

    header, rows = cli_table(ok(address, "project list"))
    assert header == ["NAME", "BASIS", "PATH", "ID"]
    assert ["cli-pt-web", "cli-pt-basis", web, pid] in rows

    got = ok_json(address, "project get cli-pt-web")
    assert got["resource_id"] == pid
    assert (got["basis"]["name"], got["basis"]["resource_id"]) == (basis.name, basis.resource_id)

    target = ok_json(address, "target upsert cli-pt-vm --project cli-pt-web --state created")
    tid = target["resource_id"]
    assert target["state"] == "CREATED" and target["project"]["resource_id"] == pid

    bogus = cli(address, "target upsert cli-pt-vm2 --project cli-pt-web --state bogus")
    assert_cli_error(bogus, "--state must be one of", "CREATED", "'bogus'")

    header, rows = cli_table(ok(address, "target list --project cli-pt-web"))
    assert header == ["NAME", "PROJECT", "ID"]
    assert rows == [["cli-pt-vm", "cli-pt-web", tid]], "a bogus state still made a target"

    got = ok_json(address, "target get cli-pt-vm --project cli-pt-web")
    assert (got["resource_id"], got["name"], got["state"]) == (tid, "cli-pt-vm", "CREATED")

    deleted = ok(address, "target delete cli-pt-vm --project cli-pt-web")
    assert deleted.strip() == f"deleted target cli-pt-vm ({tid})"
    targets = direct.vagrant.ListTargets(Empty(), timeout=10).targets
    assert tid not in {r.resource_id for r in targets}

    assert ok(address, "project delete cli-pt-web").strip() == f"deleted project cli-pt-web ({pid})"
    projects = direct.vagrant.ListProjects(Empty(), timeout=10).projects
    assert pid not in {r.resource_id for r in projects}
    direct.delete_basis(basis.name)


# -- boxes -----------------------------------------------------------------------


def test_box_versions_constraints_and_delete(address: str, direct: Direct) -> None:
    ids = {}
    for version in ("1.2.0", "1.10.0", "2.0.0"):
        where = f"/boxes/{version}"
        upsert = f"box upsert cli/boxy --version {version} --provider virtualbox --directory"
        box = ok_json(address, upsert, where)
        assert (box["name"], box["version"], box["directory"]) == ("cli/boxy", version, where)
        ids[version] = box["resource_id"]

    # `~> 1.2` is >= 1.2, < 2.0: the highest of those is 1.10.0 (not 2.0.0, and not 1.2.0,
    # which a sort as text would pick).
    best = ok_json(address, "box get cli/boxy --version '~> 1.2'")
    assert (best["version"], best["resource_id"]) == ("1.10.0", ids["1.10.0"])

    assert_cli_error(cli(address, "box get cli/boxy --version '>= 9'"), "no box", "'cli/boxy'")

    listed = [b for b in ok_json(address, "box list") if b["name"] == "cli/boxy"]
    assert sorted((b["version"], b["provider"], b["resource_id"]) for b in listed) == [
        (v, "virtualbox", ids[v]) for v in ("1.10.0", "1.2.0", "2.0.0")
    ]

    deleted = ok(address, "box delete cli/boxy --version 1.10.0 --provider virtualbox")
    assert deleted.strip() == "deleted box cli/boxy 1.10.0 virtualbox"
    ref = sdk.Ref.Box(name="cli/boxy", version="~> 1.2")
    found = direct.vagrant.FindBox(vs.FindBoxRequest(box=ref), timeout=10)
    assert (found.box.version, found.box.resource_id) == ("1.2.0", ids["1.2.0"])


# -- errors ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "extra", "fragments"),
    [
        ("basis get nope", (), ["not found", "'nope'"]),
        ("basis upsert --path /srv/long", ("x" * 10240,), ["too long", "at most 255"]),
        ("basis upsert cli-nv --path /srv/nv -m novalue", (), ["KEY=VALUE", "'novalue'"]),
        (f"--address {DOWN} basis list", (), ["cannot reach", DOWN]),
    ],
    ids=["not-found", "too-long", "malformed-meta", "server-down"],
)
def test_errors_are_one_line_and_exit_1(
    address: str, command: str, extra: tuple[str, ...], fragments: list[str]
) -> None:
    # --address on the command line wins over WAYSTATION_ADDR, which points at a live server.
    assert_cli_error(cli(address, command, *extra), *fragments)


# -- on each backend -------------------------------------------------------------


def test_scenario_on_each_backend(backend_url: str, tmp_path: Path) -> None:
    server = t.ServerProcess(tmp_path / "data", backend_url)
    own = server.start()
    try:
        basis = ok_json(own, "basis upsert home --path", str(tmp_path / "home"))
        project = ok_json(own, "project upsert web -b home --path", str(tmp_path / "web"))
        assert project["basis"]["resource_id"] == basis["resource_id"]
        target = ok_json(own, "target upsert vm -p web --state halted --provider virtualbox")
        assert target["project"]["resource_id"] == project["resource_id"]
        assert target["project"]["basis"]["name"] == "home"
        assert (target["state"], target["provider"]) == ("HALTED", "virtualbox")
        # 1.10.0 > 1.9.0 as versions, not as text: the backend must not sort strings.
        for version in ("1.10.0", "1.9.0"):
            upsert = f"box upsert hashicorp/bionic64 --version {version} --provider virtualbox"
            ok(own, upsert, "--directory", f"/boxes/{version}")
        box = ok_json(own, "box get hashicorp/bionic64 --version '~> 1.0'")
        assert (box["version"], box["directory"]) == ("1.10.0", "/boxes/1.10.0")
    finally:
        assert server.stop() == 0, server.output()


# -- rough edges found once, kept from coming back ---------------------------------


def test_error_with_brackets_in_the_input_is_one_line(address: str) -> None:
    assert_cli_error(cli(address, "basis get", "[/x]"), "not found", "'[/x]'")


def test_values_with_brackets_are_printed_verbatim(
    address: str, direct: Direct, tmp_path: Path
) -> None:
    try:
        made = ok(address, "basis upsert", "[/x]", "--path", str(tmp_path / "brackets"))
        assert "name: [/x]" in made.splitlines()
    finally:
        direct.delete_basis("[/x]")


def test_list_table_does_not_cut_long_paths(address: str, direct: Direct, tmp_path: Path) -> None:
    basis = direct.basis("cli-cut-basis", str(tmp_path / "home"))
    path = "/home/alice/src/github.com/example/infrastructure/environments/staging/web"
    try:
        project = direct.project(basis, "cli-cut-web", path)
        _, rows = cli_table(ok(address, "project list"))
        assert ["cli-cut-web", "cli-cut-basis", path, project.resource_id] in rows
    finally:
        direct.delete_basis(basis.name)


def test_target_commands_can_name_the_basis_of_an_ambiguous_project(
    address: str, direct: Direct, tmp_path: Path
) -> None:
    one = direct.basis("cli-amb-one", str(tmp_path / "one"))
    two = direct.basis("cli-amb-two", str(tmp_path / "two"))
    try:
        project = direct.project(one, "cli-amb-web", str(tmp_path / "one" / "web"))
        direct.project(two, "cli-amb-web", str(tmp_path / "two" / "web"))
        vm = direct.target(project, "cli-amb-vm")
        out = ok(address, "target list --project cli-amb-web --basis cli-amb-one")
        assert cli_table(out)[1] == [["cli-amb-vm", "cli-amb-web", vm.resource_id]]
    finally:
        direct.delete_basis(one.name)
        direct.delete_basis(two.name)


def test_target_get_by_name_without_project_says_what_is_missing(
    address: str, direct: Direct, tmp_path: Path
) -> None:
    basis = direct.basis("cli-tg-basis", str(tmp_path / "home"))
    try:
        direct.target(direct.project(basis, "cli-tg-web", str(tmp_path / "web")), "cli-tg-vm")
        result = cli(address, "target get cli-tg-vm")
        assert result.returncode == 0 or "--project" in result.stderr, show(result)
    finally:
        direct.delete_basis(basis.name)


def test_client_commands_do_not_import_the_storage_stack(address: str) -> None:
    result = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "waystation.cli.main", "--version"],
        env=_env(address),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, show(result)
    imported = {line.rsplit("|", 1)[-1].strip() for line in result.stderr.splitlines()}
    assert not {"sqlalchemy", "alembic"} & imported
