"""Auth as people use it: `waystation login`, tokens, contexts, TLS and keys, by the CLI.

Every test runs `python -m waystation.cli.main ...` as a child process against
`waystation server run` (also a child process, SQLite, auth on unless the test
is about --dev). Saved contexts go to a WAYSTATION_CONFIG file under tmp_path,
never to the user's config directory.
"""

from __future__ import annotations

import getpass
import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty

from waystation import testing as t
from waystation.auth import tokens
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc

Result = subprocess.CompletedProcess[str]


# -- harness ---------------------------------------------------------------------------


class FreshServer(t.ServerProcess):
    """`server run` with auth on, left un-bootstrapped for `waystation login` to do it."""

    def _bootstrap(self) -> str:
        return ""


def cli(config: Path, *args: str, timeout: float = 60) -> Result:
    """`waystation ARGS` with WAYSTATION_CONFIG=config and no other WAYSTATION_ settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYSTATION_")}
    for noise in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "LINES"):
        env.pop(noise, None)
    env["WAYSTATION_CONFIG"] = str(config)
    env["COLUMNS"] = "80"
    return subprocess.run(
        [sys.executable, "-m", "waystation.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def show(result: Result) -> str:
    return f"exit {result.returncode}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}"


def ok(config: Path, *args: str) -> str:
    result = cli(config, *args)
    assert result.returncode == 0, show(result)
    assert "Traceback" not in result.stderr, show(result)
    return result.stdout


def error(result: Result, *fragments: str) -> str:
    """Exit 1, exactly one `error: ...` line on stderr, no traceback."""
    assert "Traceback" not in result.stderr + result.stdout, show(result)
    assert result.returncode == 1, show(result)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), show(result)
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    return lines[0]


def saved(config: Path) -> dict[str, object]:
    data: dict[str, object] = json.loads(config.read_text())
    return data


def saved_token(config: Path, name: str) -> str:
    contexts = saved(config)["contexts"]
    assert isinstance(contexts, dict)
    token: str = contexts[name]["token"]
    return token


def table(stdout: str) -> list[list[str]]:
    """Rows of a `list` table (without its header), split on runs of spaces."""
    return [line.split() for line in stdout.splitlines()[1:] if line.strip()]


def make_basis(address: str, token: str, name: str) -> None:
    with grpc.insecure_channel(address) as ch:
        request = vs.UpsertBasisRequest(basis=t.basis(name, f"/srv/{name}"))
        md = (("authorization", token),)
        vs_grpc.VagrantStub(ch).UpsertBasis(request, metadata=md, timeout=10)


def list_status(address: str, token: str) -> grpc.StatusCode:
    with grpc.insecure_channel(address) as ch:
        try:
            md = (("authorization", token),)
            vs_grpc.VagrantStub(ch).ListBasis(Empty(), metadata=md, timeout=10)
        except grpc.RpcError as exc:
            code: grpc.StatusCode = exc.code()
            return code
    return grpc.StatusCode.OK


@pytest.fixture
def servers() -> Iterator[Callable[[t.ServerProcess], str]]:
    """Start servers for a test; each is stopped cleanly (exit 0) afterwards."""
    started: list[t.ServerProcess] = []

    def run(server: t.ServerProcess) -> str:
        started.append(server)
        return server.start()

    yield run
    for server in started:
        if server.proc is not None and server.proc.poll() is None:
            assert server.stop() == 0, server.output()


# -- login, bootstrap, saved contexts --------------------------------------------------


def test_login_bootstraps_a_fresh_server_and_saves_a_context(
    tmp_path: Path, servers: Callable[[t.ServerProcess], str]
) -> None:
    address = servers(FreshServer(tmp_path / "data", auth=True))
    config = tmp_path / "config" / "contexts.json"

    out = ok(config, "--address", address, "login")
    assert f"logged in to {address}" in out
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert saved(config)["current"] == address
    token = saved_token(config, address)
    claims, key_id = tokens.unverified(token)
    assert claims.login and key_id == "k1"
    assert not list(config.parent.glob("*.tmp"))

    # Address and token now come from the context.
    make_basis(address, token, "from-context")
    rows = table(ok(config, "basis", "list"))
    assert ["from-context"] in [row[:1] for row in rows]

    # A second login finds the server bootstrapped.
    line = error(cli(config, "--address", address, "login"), "already bootstrapped")
    assert "--invite" in line
    assert saved_token(config, address) == token  # the saved token is left alone

    # Without a saved context or --token: refused, with a hint.
    elsewhere = tmp_path / "elsewhere" / "contexts.json"
    line = error(cli(elsewhere, "--address", address, "basis", "list"), "log in")
    assert "Authorization token is not supplied" in line
    assert not elsewhere.exists()
    assert "from-context" in ok(elsewhere, "--address", address, "--token", token, "basis", "list")


def test_invite_login_inspect_revoke_and_contexts(
    tmp_path: Path, servers: Callable[[t.ServerProcess], str]
) -> None:
    server = t.ServerProcess(tmp_path / "data", auth=True)
    address = servers(server)
    admin = ("--address", address, "--token", server.token)
    first = tmp_path / "first.json"  # the admin's config: nothing saved
    mine = tmp_path / "mine" / "contexts.json"  # the invited colleague's

    invite = ok(first, *admin, "token", "invite", "--duration", "1h").strip()
    claims, _ = tokens.unverified(invite)
    assert claims.invite and claims.HasField("valid_until")
    assert not first.exists()

    out = ok(mine, "--address", address, "login", "--invite", invite)
    assert "logged in" in out
    assert saved(mine)["current"] == address
    assert stat.S_IMODE(mine.stat().st_mode) == 0o600
    login = saved_token(mine, address)
    assert tokens.unverified(login)[0].login
    make_basis(address, server.token, "shared")
    assert "shared" in ok(mine, "basis", "list")

    # `token inspect` shows the id that `token revoke` takes.
    ident = tokens.token_id_hex(tokens.unverified(login)[0])
    rows = table(ok(mine, "token", "inspect"))
    assert rows[0][:3] == [ident, "login", "admin"]  # no --user: the inviter
    rows = table(ok(mine, "token", "inspect", invite))
    assert rows[0][:2] == [tokens.token_id_hex(claims), "invite"]

    # A second context, from a second invite: it becomes current.
    invite2 = ok(first, *admin, "token", "invite", "--duration", "1h").strip()
    ok(mine, "--address", address, "login", "--invite", invite2, "--name", "other")
    rows = table(ok(mine, "context", "list"))
    assert sorted(rows) == sorted([[address, address, "no"], ["*", "other", address, "no"]])
    assert "using" in ok(mine, "context", "use", address)
    assert saved(mine)["current"] == address
    rows = table(ok(mine, "context", "list"))
    assert sorted(rows) == sorted([["*", address, address, "no"], ["other", address, "no"]])
    error(cli(mine, "context", "use", "nope"), "no context 'nope'")

    # Revoking the colleague's login token: their next call fails, the other context works.
    assert f"revoked {ident}" in ok(first, *admin, "token", "revoke", ident)
    line = error(cli(mine, "basis", "list"), "revoked")
    assert "UNAUTHENTICATED" in line or "log in" in line
    assert "shared" in ok(mine, "--context", "other", "basis", "list")
    assert "already revoked" in ok(first, *admin, "token", "revoke", ident)
    error(cli(first, *admin, "token", "revoke", "not-an-id"), "32 hex digits")


def test_login_invite_with_address_after_login_as_documented(
    tmp_path: Path, servers: Callable[[t.ServerProcess], str]
) -> None:
    server = t.ServerProcess(tmp_path / "data", auth=True)
    address = servers(server)
    with grpc.insecure_channel(address) as ch:
        request = vs.InviteTokenRequest(duration="1h")
        md = (("authorization", server.token),)
        invite = vs_grpc.VagrantStub(ch).GenerateInviteToken(request, metadata=md).token
    config = tmp_path / "contexts.json"
    ok(config, "login", "--invite", invite, "--address", address)
    assert saved(config)["current"] == address


def test_token_inspect_follows_the_selected_context(tmp_path: Path) -> None:
    config = tmp_path / "contexts.json"
    one = tokens.encode(tokens.login_token(), "k1", tokens.new_key())
    two = tokens.encode(tokens.login_token(), "k1", tokens.new_key())
    config.write_text(
        json.dumps(
            {
                "current": "one",
                "contexts": {
                    "one": {"address": "127.0.0.1:1", "token": one},
                    "two": {"address": "127.0.0.1:1", "token": two},
                },
            }
        )
    )
    ident = tokens.token_id_hex(tokens.unverified(two)[0])
    assert table(ok(config, "--context", "two", "token", "inspect"))[0][0] == ident


def labelled(stdout: str) -> dict[str, str]:
    """`label: value` lines as a dict."""
    return {
        k.strip(): v.strip() for k, _, v in (line.partition(":") for line in stdout.splitlines())
    }


def test_whoami_logout_and_context_delete(
    tmp_path: Path, servers: Callable[[t.ServerProcess], str]
) -> None:
    server = t.ServerProcess(tmp_path / "data", auth=True)
    address = servers(server)
    admin = (tmp_path / "admin.json", "--address", address, "--token", server.token)
    config = tmp_path / "contexts.json"
    invite = ok(*admin, "token", "invite", "--duration", "1h").strip()
    ok(config, "--address", address, "login", "--invite", invite, "--name", "work")
    token = saved_token(config, "work")
    ident = tokens.token_id_hex(tokens.unverified(token)[0])

    # Decoded here, confirmed by the server. Login tokens expire (the server's
    # --token-ttl, 30 days unless told).
    shown = labelled(ok(config, "whoami"))
    expires = shown.pop("expires")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", expires)
    assert shown == {
        "server": f"{address} (context work)",
        "user": "admin",
        "role": "admin",
        "token id": ident,
        "server says": "accepted",
    }
    assert json.loads(ok(config, "whoami", "--json")) == {
        "address": address,
        "context": "work",
        "user": "admin",
        "role": "admin",
        "token_id": ident,
        "kind": "login",
        "expires": expires,
        "accepted": True,
        "refused_because": None,
    }
    inspected = json.loads(ok(config, "token", "inspect", invite, "--json"))
    assert inspected["kind"] == "invite" and inspected["user"] == "admin"
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", inspected["valid_until"])
    assert json.loads(ok(config, "token", "inspect", "--json"))["id"] == ident

    # Revoked on the server: whoami still decodes it, and says the server refuses it.
    ok(*admin, "token", "revoke", ident)
    refused = cli(config, "whoami")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, show(refused)
    said = labelled(refused.stdout)
    assert said["token id"] == ident and said["server says"].startswith("refused: "), said
    assert "revoked" in said["server says"], said
    refused_json = json.loads(cli(config, "whoami", "--json").stdout)
    assert refused_json["accepted"] is False and "revoked" in refused_json["refused_because"]

    # logout forgets the token here, and says so; the context stays.
    out = ok(config, "logout")
    assert f"logged out of context work ({address})" in out and ident in out, out
    assert saved_token(config, "work") == ""
    assert saved(config)["current"] == "work"
    assert "nothing to forget" in ok(config, "logout")
    assert json.loads(ok(config, "logout", "--json"))["forgotten_token_id"] is None
    no_token = cli(config, "whoami")
    assert no_token.returncode == 1, show(no_token)
    assert labelled(no_token.stdout)["token"].startswith("none"), show(no_token)

    # context delete: another context stays current; deleting the current one leaves none.
    invite2 = ok(*admin, "token", "invite", "--duration", "1h").strip()
    ok(config, "--address", address, "login", "--invite", invite2, "--name", "other")
    listed = json.loads(ok(config, "context", "list", "--json"))
    assert [(c["name"], c["current"], c["logged_in"]) for c in listed] == [
        ("other", True, True),
        ("work", False, False),
    ]
    assert "token" not in json.dumps(listed).replace("logged_in", "")
    assert json.loads(ok(config, "context", "delete", "work", "--json")) == {
        "deleted": "work",
        "was_current": False,
    }
    assert ok(config, "context", "delete", "other").strip() == "deleted context other"
    assert saved(config) == {"current": "", "contexts": {}}
    error(cli(config, "context", "delete", "nope"), "no context 'nope'")
    error(cli(config, "logout"), "no current context")


# -- --dev -----------------------------------------------------------------------------


@pytest.mark.parametrize("listen", ["0.0.0.0:0", "[::]:0", ":0"])
def test_dev_mode_refuses_beyond_loopback(tmp_path: Path, listen: str) -> None:
    result = cli(
        tmp_path / "contexts.json",
        *("server", "run", "--dev", "--listen", listen, "--data-dir", str(tmp_path / "data")),
        timeout=30,
    )
    assert result.returncode != 0, show(result)
    assert "loopback" in result.stderr, show(result)
    assert "Traceback" not in result.stderr, show(result)
    assert "listening on" not in result.stderr + result.stdout


def test_dev_mode_on_loopback_serves_without_a_token(
    tmp_path: Path, servers: Callable[[t.ServerProcess], str]
) -> None:
    server = t.ServerProcess(tmp_path / "data")  # --dev
    address = servers(server)
    assert "DEV MODE" in server.output()
    assert re.search(r"WARNING.*DEV MODE: authentication is OFF", server.output())
    assert list_status(address, "") == grpc.StatusCode.OK
    make_basis(address, "", "dev-basis")
    assert "dev-basis" in ok(tmp_path / "contexts.json", "--address", address, "basis", "list")


def test_auth_is_on_by_default(tmp_path: Path, servers: Callable[[t.ServerProcess], str]) -> None:
    server = t.ServerProcess(tmp_path / "data", auth=True)
    address = servers(server)
    assert "DEV MODE" not in server.output()
    assert list_status(address, "") == grpc.StatusCode.UNAUTHENTICATED
    assert list_status(address, server.token) == grpc.StatusCode.OK


# -- TLS -------------------------------------------------------------------------------


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


@pytest.fixture
def self_signed(tmp_path: Path) -> tuple[Path, Path]:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost"),
        *("-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1", "-days", "1"),
        *("-keyout", str(key), "-out", str(cert)),
    )
    return cert, key


def test_tls(
    tmp_path: Path, self_signed: tuple[Path, Path], servers: Callable[[t.ServerProcess], str]
) -> None:
    cert, key = self_signed
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    address = servers(FreshServer(tmp_path / "data", "", *tls, auth=True))
    config = tmp_path / "contexts.json"

    ok(config, "--address", address, "--tls-ca", str(cert), "login")
    token = saved_token(config, address)
    contexts = saved(config)["contexts"]
    assert isinstance(contexts, dict)
    assert contexts[address]["tls_ca"] == str(cert)
    ok(config, "--tls-ca", str(cert), "basis", "list")
    ok(config, "basis", "list")  # the context remembers the CA
    assert table(ok(config, "context", "list"))[0][:3] == ["*", address, address]

    other = tmp_path / "other.json"
    with_token = ("--address", address, "--token", token)
    ok(other, *with_token, "--tls-skip-verify", "basis", "list")
    # localhost is in the certificate too.
    port = address.rsplit(":", 1)[1]
    ok(
        other,
        "--address",
        f"localhost:{port}",
        "--token",
        token,
        "--tls-ca",
        str(cert),
        "basis",
        "list",
    )

    # A plain client cannot talk to a TLS server, and is told to use --tls; nor can TLS
    # that trusts only system roots.
    line = error(cli(other, *with_token, "basis", "list"))
    assert address in line and "speaks TLS" in line and "--tls" in line, line
    refused = cli(other, *with_token, "--tls", "basis", "list")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr, show(refused)
    assert refused.stderr.splitlines()[-1].startswith("error: "), show(refused)
    assert "CERTIFICATE_VERIFY_FAILED" in refused.stderr.splitlines()[-1]


def test_untrusted_certificate_is_a_one_line_error(
    tmp_path: Path, self_signed: tuple[Path, Path], servers: Callable[[t.ServerProcess], str]
) -> None:
    cert, key = self_signed
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    address = servers(FreshServer(tmp_path / "data", "", *tls, auth=True))
    result = cli(tmp_path / "contexts.json", "--address", address, "--tls", "basis", "list")
    error(result, "CERTIFICATE_VERIFY_FAILED")


def test_tls_skip_verify_with_a_ca_signed_certificate(
    tmp_path: Path, servers: Callable[[t.ServerProcess], str]
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    ca_key, ca_cert = tmp_path / "ca.key", tmp_path / "ca.pem"
    key, csr, cert = tmp_path / "key.pem", tmp_path / "req.csr", tmp_path / "cert.pem"
    ext = tmp_path / "ext.cnf"
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    openssl(
        *("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=Test CA"),
        *("-days", "1", "-keyout", str(ca_key), "-out", str(ca_cert)),
    )
    openssl(
        *("req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost"),
        *("-keyout", str(key), "-out", str(csr)),
    )
    openssl(
        *("x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key)),
        *("-CAcreateserial", "-days", "1", "-extfile", str(ext), "-out", str(cert)),
    )
    tls = ("--tls-cert", str(cert), "--tls-key", str(key))
    address = servers(FreshServer(tmp_path / "data", "", *tls, auth=True))
    config = tmp_path / "contexts.json"
    # The proper way works: the CA verifies the chain.
    ok(config, "--address", address, "--tls-ca", str(ca_cert), "login")
    token = saved_token(config, address)
    ok(
        tmp_path / "x.json",
        "--address",
        address,
        "--token",
        token,
        "--tls-skip-verify",
        "basis",
        "list",
    )


def test_context_list_shows_tls_for_a_ca_or_skip_verify_context(tmp_path: Path) -> None:
    config = tmp_path / "contexts.json"
    contexts = {
        "ca": {"address": "127.0.0.1:1", "tls_ca": "/etc/ca.pem"},
        "skip": {"address": "127.0.0.1:2", "tls_skip_verify": True},
        "tls": {"address": "127.0.0.1:3", "tls": True},
    }
    config.write_text(json.dumps({"current": "tls", "contexts": contexts}))
    rows = table(ok(config, "context", "list"))
    assert {row[-2]: row[-1] for row in rows} == {
        "127.0.0.1:1": "yes",
        "127.0.0.1:2": "yes",
        "127.0.0.1:3": "yes",
    }


# -- signing keys ----------------------------------------------------------------------


def test_server_keys_rotate_list_retire(
    tmp_path: Path, servers: Callable[[t.ServerProcess], str]
) -> None:
    data = tmp_path / "data"
    server = t.ServerProcess(data, auth=True)
    address = servers(server)  # bootstrapped: k1 exists
    config = tmp_path / "contexts.json"
    keys = ("server", "keys")

    assert ok(config, *keys, "rotate", "--data-dir", str(data)).strip() == "new signing key k2"
    listed = [
        line.split("\t")[:2]
        for line in ok(config, *keys, "list", "--data-dir", str(data)).splitlines()
    ]
    assert listed == [["k1", "active"], ["k2", "active"]]

    # The running server signs with k2 at once and still accepts k1 tokens.
    fresh = ok(config, "--address", address, "--token", server.token, "token", "login").strip()
    assert tokens.unverified(fresh)[1] == "k2"
    assert list_status(address, server.token) == grpc.StatusCode.OK

    assert ok(config, *keys, "retire", "k1", "--data-dir", str(data)).strip() == "retired k1"
    deadline = time.monotonic() + 5
    while list_status(address, server.token) != grpc.StatusCode.UNAUTHENTICATED:
        assert time.monotonic() < deadline, "a k1 token still works 5 s after retiring k1"
        time.sleep(0.1)
    assert list_status(address, fresh) == grpc.StatusCode.OK
    listed = [
        line.split("\t")[:2]
        for line in ok(config, *keys, "list", "--data-dir", str(data)).splitlines()
    ]
    assert listed == [["k1", "retired"], ["k2", "active"]]
    stamp = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z"
    keys_json = json.loads(ok(config, *keys, "list", "--data-dir", str(data), "--json"))
    assert [(k["id"], k["state"]) for k in keys_json] == [("k1", "retired"), ("k2", "active")]
    assert re.fullmatch(stamp, keys_json[0]["created"]), keys_json
    assert re.fullmatch(stamp, keys_json[0]["retired"]) and keys_json[1]["retired"] is None
    error(cli(config, *keys, "retire", "k2", "--data-dir", str(data)), "only active key")
    error(cli(config, *keys, "retire", "k7", "--data-dir", str(data)), "no active key")

    # Each change is in the audit log, by the OS user who ran it (no token, no peer);
    # the refused retirements are not.
    admin = ("--address", address, "--token", fresh)
    events = json.loads(ok(config, *admin, "audit", "list", "--action", "key.", "--json"))
    assert [(e["action"], e["object"]) for e in events] == [
        ("key.retire", "k1"),
        ("key.rotate", "k2"),
    ]
    local = f"local:{getpass.getuser()}"
    assert {(e["user"], e["outcome"]) for e in events} == {(local, "ok")}
    assert not any("token_id" in e or "peer" in e for e in events)  # empty: left out
