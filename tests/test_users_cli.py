"""Users and roles as people use them (issue #21): `waystation login --user`,
`user create|list|get|set-role|disable|delete`, `token login --user`, whoami's
role, by the CLI as a child process against `waystation server run`."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

from test_auth_cli import FreshServer, cli, error, labelled, ok, servers, table

from waystation import testing as t

__all__ = ["servers"]  # the fixture, imported for pytest


def test_users_roles_and_their_tokens(
    tmp_path: Path, servers: Callable[[t.ServerProcess], str]
) -> None:
    address = servers(FreshServer(tmp_path / "data", auth=True))
    root = tmp_path / "root.json"
    ok(root, "--address", address, "login", "--user", "root")
    assert labelled(ok(root, "whoami"))["role"] == "admin"

    ok(root, "user", "create", "alice")  # a member unless told
    ok(root, "user", "create", "ci-runner-1", "--role", "runner")
    assert [r[:2] for r in table(ok(root, "user", "list"))] == [
        ["alice", "member"],
        ["ci-runner-1", "runner"],
        ["root", "admin"],
    ]
    listed = json.loads(ok(root, "user", "list", "--json"))
    assert [u["name"] for u in listed] == ["alice", "ci-runner-1", "root"]
    error(cli(root, "user", "create", "ALICE"), "already exists")
    usage = cli(root, "user", "create", "bob", "--role", "boss")
    assert usage.returncode == 2 and "'boss' is not one of" in usage.stderr

    # An admin mints for anyone; the runner's token is a runner's.
    runner_token = ok(root, "token", "login", "--user", "ci-runner-1").strip()
    alice_token = ok(root, "token", "login", "--user", "alice").strip()
    runner = ("--address", address, "--token", runner_token)
    alice = ("--address", address, "--token", alice_token)
    assert labelled(ok(root, *runner, "whoami"))["role"] == "runner"
    assert json.loads(ok(root, *alice, "whoami", "--json"))["role"] == "member"

    # A member manages no users and mints only for themselves.
    error(
        cli(root, *alice, "user", "list"),
        "this call needs the admin role; your token's user alice is a member",
    )
    error(cli(root, *alice, "token", "login", "--user", "root"), "only an admin")
    assert ok(root, *alice, "token", "login").strip()

    ok(root, "user", "set-role", "alice", "admin")
    assert labelled(ok(root, *alice, "whoami"))["role"] == "admin"
    ok(root, "user", "disable", "alice")
    assert "alice is disabled" in cli(root, *alice, "whoami").stdout
    assert ok(root, "user", "get", "alice", "--json").count('"disabled": true') == 1
    ok(root, "user", "delete", "alice")
    error(cli(root, "user", "get", "alice"), "no user 'alice'")
    error(cli(root, "user", "delete", "root"), "last enabled admin")


def test_the_audit_log_says_who_did_what(
    tmp_path: Path, servers: Callable[[t.ServerProcess], str]
) -> None:
    address = servers(FreshServer(tmp_path / "data", auth=True))
    root = tmp_path / "root.json"
    ok(root, "--address", address, "login", "--user", "root")
    ok(root, "user", "create", "ci-runner-1", "--role", "runner")
    runner_token = ok(root, "token", "login", "--user", "ci-runner-1").strip()
    error(cli(root, "user", "create", "CI-RUNNER-1"), "already exists")  # no entry

    rows = table(ok(root, "audit", "list"))
    assert [(r[1], r[3]) for r in rows] == [
        ("root", "token.login"),
        ("root", "user.create"),
        ("root", "token.bootstrap"),
    ]
    events = json.loads(ok(root, "audit", "list", "--action", "user.", "--json"))
    assert [(e["action"], e["object"]) for e in events] == [("user.create", "ci-runner-1 (runner)")]
    assert events[0]["peer"].startswith("ipv")
    assert (
        json.loads(ok(root, "audit", "list", "--user", "nobody", "--since", "1h", "--json")) == []
    )
    runner = ("--address", address, "--token", runner_token)
    error(cli(root, *runner, "audit", "list"), "needs the admin role")


def test_a_member_cannot_create_a_workspace_for_another_owner(
    tmp_path: Path, servers: Callable[[t.ServerProcess], str]
) -> None:
    """The CLI forwards `--owner`; the server refuses a member acting as another."""
    address = servers(FreshServer(tmp_path / "data", auth=True))
    root = tmp_path / "root.json"
    ok(root, "--address", address, "login", "--user", "root")
    ok(root, "user", "create", "alice")
    alice = ("--address", address, "--token", ok(root, "token", "login", "--user", "alice").strip())
    refused = cli(
        root, *alice, "workspace", "create", "box", "--template", "dev", "--owner", "root"
    )
    error(
        refused,
        "acting as another owner (root) needs the admin role; your token's user alice is a member",
        "PERMISSION_DENIED",
    )
    assert json.loads(ok(root, "workspace", "list", "--json")) == []
    assert json.loads(ok(root, "audit", "list", "--action", "workspace.", "--json")) == []


def test_tokens_per_user_ttl_labels_and_invites_with_roles(
    tmp_path: Path, servers: Callable[[t.ServerProcess], str]
) -> None:
    address = servers(FreshServer(tmp_path / "data", auth=True))
    root = tmp_path / "root.json"
    ok(root, "--address", address, "login", "--user", "root")
    ok(root, "user", "create", "alice")
    laptop = ok(root, "token", "login", "--user", "alice", "--ttl", "30d", "--label", "laptop")
    alice = ("--address", address, "--token", laptop.strip())
    assert labelled(ok(root, *alice, "whoami"))["expires"] != "never"
    error(cli(root, *alice, "token", "login", "--ttl", "0"), "only an admin")
    own = ok(root, *alice, "token", "login", "--label", "ci").strip()  # the default TTL
    assert json.loads(ok(root, *alice, "whoami", "--json"))["expires"] is not None

    # alice lists and revokes her own; root lists everyone's.
    mine = json.loads(ok(root, *alice, "token", "list", "--json"))
    assert [(x["user"], x.get("label", "")) for x in mine] == [("alice", "laptop"), ("alice", "ci")]
    assert all("expiresAt" in x or "expires_at" in x for x in mine)
    error(cli(root, *alice, "token", "list", "--user", "root"), "only an admin")
    every = table(ok(root, "token", "list"))
    assert [r[1] for r in every] == ["root", "alice", "alice"]
    root_id = every[0][0]
    error(cli(root, *alice, "token", "revoke", root_id), "only an admin")
    own_id = mine[1]["id"]
    ok(root, *alice, "token", "revoke", own_id)
    assert "revoked" in cli(root, "--address", address, "--token", own, "whoami").stdout

    # An invite carries its user and role: converting it creates that user.
    invite = ok(root, "token", "invite", "--user", "ci-9", "--role", "runner").strip()
    ci = tmp_path / "ci.json"
    ok(ci, "--address", address, "login", "--invite", invite)
    assert labelled(ok(ci, "whoami"))["role"] == "runner"
    assert ["ci-9", "runner"] in [r[:2] for r in table(ok(root, "user", "list"))]
