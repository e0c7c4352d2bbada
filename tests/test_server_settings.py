"""How `waystation server run` is set up and started: the --config file and its
precedence (flag > environment > file > default), `server config`, waiting for a
database that is down at start (file modes: test_private_files.py)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, cast

import psycopg
import pytest
import sqlalchemy as sa
import typer.main

from waystation import testing as t
from waystation.cli import server as server_cli
from waystation.store import Store
from waystation.store.connect import DatabaseUnreachable, open_store, reason, redact, retryable

# -- helpers ---------------------------------------------------------------------------


def waystation(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WAYSTATION_")}
    return subprocess.run(
        [sys.executable, "-m", "waystation.cli.main", *args],
        env={**clean, **(env or {})},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def settings_of(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = waystation("server", "config", "--json", *args, env=env)
    assert result.returncode == 0, t.show(result)
    return cast(dict[str, Any], json.loads(result.stdout))


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


@contextmanager
def closed_port() -> Iterator[int]:
    """A loopback port bound but not listening: connections to it are refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


# -- the config file -------------------------------------------------------------------


def test_the_config_file_is_used_and_flags_and_environment_override_it(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text(
        'listen = "127.0.0.1:9911"\n'
        'data-dir = "state"\n'  # relative to the file
        "db-wait = 5\n"
        "fsync = false\n"
        'ack-timeout = "45s"\n'
        'log-format = "json"\n'
        'metrics-listen = "127.0.0.1:9912"\n'
    )
    document = settings_of("--config", str(config))
    assert document["config_file"] == str(config)
    got = document["settings"]
    assert got["listen"] == {"value": "127.0.0.1:9911", "source": "file", "from": str(config)}
    assert got["data-dir"]["value"] == str(tmp_path / "state")
    assert got["db"] == {"value": f"sqlite:///{tmp_path / 'state' / 'waystation.db'}",
                         "source": "default"}  # fmt: skip
    assert got["db-wait"]["value"] == 5
    assert got["fsync"]["value"] is False
    assert got["ack-timeout"]["value"] == "45s"
    assert got["log-format"]["value"] == "json"
    assert got["heartbeat-timeout"] == {"value": "2m", "source": "default"}

    # A flag beats the file; an environment variable beats the file but not a flag.
    env = {"WAYSTATION_LISTEN": "127.0.0.1:9921", "WAYSTATION_DB_WAIT": "7s"}
    mixed = settings_of("--config", str(config), "--fsync", "--db-wait", "9s", env=env)["settings"]
    assert mixed["fsync"] == {"value": True, "source": "flag"}
    assert mixed["listen"] == {
        "value": "127.0.0.1:9921",
        "source": "environment",
        "from": "WAYSTATION_LISTEN",
    }
    assert mixed["db-wait"] == {"value": "9s", "source": "flag"}
    # Environment variables apply only to what they name.
    assert mixed["ack-timeout"]["source"] == "file"


def test_every_option_of_server_run_has_a_key(tmp_path: Path) -> None:
    command = typer.main.get_command(server_cli.app)
    run = command.commands["run"]  # type: ignore[attr-defined]
    flags = {p.opts[0].lstrip("-") for p in run.params if p.opts and p.name != "config"}
    keys = set(settings_of()["settings"])
    assert keys == flags
    assert {"db-wait", "log-format", "data-dir", "fsync"} <= keys
    # And the file takes each of them (with its default's value).
    config = tmp_path / "all.toml"
    defaults = {"db-wait": "60s", "fsync": True, "dev": False, "log-format": "text"}
    config.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in defaults.items()))
    got = settings_of("--config", str(config))["settings"]
    assert {k: got[k]["source"] for k in defaults} == dict.fromkeys(defaults, "file")


@pytest.mark.parametrize(
    ("content", "fragments"),
    [
        ('data_dir = "x"\n', ["unknown key 'data_dir'", "did you mean 'data-dir'"]),
        ("colour = 1\n", ["unknown key 'colour'"]),
        ('fsync = "no"\n', ["key 'fsync'", "must be a boolean"]),
        ("listen = 9701\n", ["key 'listen'", "must be a string"]),
        ("db-wait = true\n", ["key 'db-wait'", "duration"]),
        ('ack-timeout = "2x"\n', ["ack-timeout in", 'unknown unit "x"']),
        ('log-format = "xml"\n', ["log-format in", "unknown log format 'xml'"]),
        ("listen = \n", ["not valid TOML"]),
    ],
)
def test_a_bad_config_file_is_one_line_naming_the_key(
    tmp_path: Path, content: str, fragments: list[str]
) -> None:
    config = tmp_path / "bad.toml"
    config.write_text(content)
    for command in ("config", "run"):
        result = waystation("server", command, "--config", str(config))
        assert result.returncode == 2, t.show(result)
        assert len(lines(result.stderr)) == 1, t.show(result)
        for fragment in fragments:
            assert fragment in result.stderr, t.show(result)
        assert "Traceback" not in result.stderr and "listening on" not in result.stderr


def test_a_missing_config_file_is_one_line(tmp_path: Path) -> None:
    result = waystation("server", "config", "--config", str(tmp_path / "nope.toml"))
    assert result.returncode == 2
    assert lines(result.stderr) == [f"error: cannot read the config file {tmp_path / 'nope.toml'}:"
                                    " No such file or directory"]  # fmt: skip


def test_the_server_runs_with_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "server.toml"
    config.write_text('metrics-listen = "127.0.0.1:0"\nhang-timeout = "10s"\n')
    server = t.ServerProcess(tmp_path / "data", "", "--config", str(config))
    server.start()
    assert server.stop() == 0
    output = server.output()
    assert "metrics on http://127.0.0.1:" in output
    # A warning about a setting names it as it was given: the file's key.
    assert f"the hang timeout 10s (hang-timeout in {config}) is under three" in output


def test_server_config_prints_a_table_and_hides_the_database_password() -> None:
    url = "postgresql://app:hunter2@db.internal:5432/waystation?password=hunter2&sslmode=require"
    result = waystation("server", "config", "--db", url)
    assert result.returncode == 0, t.show(result)
    assert "hunter2" not in result.stdout
    row = next(line for line in result.stdout.splitlines() if line.startswith("db "))
    assert row.split() == ["db", "postgresql://app@db.internal:5432/waystation?sslmode=require",
                           "flag"]  # fmt: skip


# -- the database at start -------------------------------------------------------------


def test_an_unsupported_database_url_is_one_line_and_exit_2(tmp_path: Path) -> None:
    for url in ("mysql://root:hunter2@x/db", "garbage"):
        result = waystation("server", "run", "--data-dir", str(tmp_path), "--db", url)
        assert result.returncode == 2, t.show(result)
        assert len(lines(result.stderr + result.stdout)) == 1, t.show(result)
        assert "unsupported database URL" in result.stderr
        assert "hunter2" not in result.stderr and "Traceback" not in result.stderr


def test_a_database_down_at_start_is_retried_then_given_up_on(tmp_path: Path) -> None:
    with closed_port() as port:
        url = f"postgresql://app:hunter2@127.0.0.1:{port}/waystation"
        result = waystation(
            "server", "run", "--dev", "--data-dir", str(tmp_path), "--db", url, "--db-wait", "2s"
        )
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert "Traceback" not in output and "hunter2" not in output
    assert "listening on" not in output
    shown = f"postgresql://app@127.0.0.1:{port}/waystation"
    waiting = re.findall(
        rf"waiting for the database at {re.escape(shown)} \(attempt (\d+)\): "
        r"connection refused; retrying in [\d.]+ s$",
        output,
        re.MULTILINE,
    )
    # 1 s apart, then 2 s, cut to what is left: how many fit depends on the machine.
    assert waiting and waiting == [str(i) for i in range(1, len(waiting) + 1)], output
    gave_up = f"gave up waiting for the database at {shown} after {len(waiting) + 1} attempts"
    assert gave_up in output
    assert len(lines(output)) == len(waiting) + 1, output  # one line per attempt, nothing else


def test_a_database_refusing_us_for_good_is_not_waited_for(
    postgres_url: str, tmp_path: Path
) -> None:
    url = sa.make_url(postgres_url).set(database="no_such_database").render_as_string(False)
    result = waystation("server", "run", "--dev", "--data-dir", str(tmp_path), "--db", url)
    output = result.stdout + result.stderr
    assert result.returncode == 1, output
    assert lines(output)[-1].endswith(
        f'cannot connect to the database at {redact(url)}: database "no_such_database"'
        " does not exist"
    )
    assert "waiting for the database" not in output and "Traceback" not in output


class LateProxy:
    """A TCP proxy to PostgreSQL on a port that refuses connections until `open()`."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.port: int = self.sock.getsockname()[1]
        self.links: list[socket.socket] = []

    def open(self) -> None:
        self.sock.listen()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.sock.accept()
            except OSError:  # closed
                return
            upstream = socket.create_connection(self.target)
            self.links += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(a, b), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        with suppress(OSError):
            while data := source.recv(65536):
                sink.sendall(data)
        with suppress(OSError):
            sink.shutdown(socket.SHUT_WR)

    def close(self) -> None:
        self.sock.close()
        for link in self.links:
            link.close()


def test_a_database_that_comes_up_during_the_wait_is_used(
    postgres_url: str, tmp_path: Path
) -> None:
    parsed = sa.make_url(postgres_url)
    proxy = LateProxy((parsed.host or "127.0.0.1", parsed.port or 5432))
    url = parsed.set(host="127.0.0.1", port=proxy.port).render_as_string(hide_password=False)
    server = t.ServerProcess(tmp_path / "data", url, "--db-wait", "5m")
    opened = threading.Event()

    def open_after_the_first_refusal() -> None:
        while not opened.is_set():
            if server.log.exists() and "(attempt 1)" in server.output():
                proxy.open()
                opened.set()
                return
            opened.wait(0.05)

    watcher = threading.Thread(target=open_after_the_first_refusal, daemon=True)
    watcher.start()
    try:
        server.start(timeout=120)
        assert "(attempt 1): connection refused" in server.output()
        assert server.stop(signal.SIGTERM) == 0
    finally:
        opened.set()
        watcher.join()
        if server.proc is not None and server.proc.poll() is None:
            server.kill()
        proxy.close()
    with psycopg.connect(postgres_url) as conn:  # it migrated the schema behind the proxy
        assert conn.execute("SELECT count(*) FROM alembic_version").fetchone() == (1,)


def _refused() -> sa.exc.OperationalError:
    orig = psycopg.OperationalError(
        'connection failed: connection to server at "10.0.0.9", port 5432 failed:'
        " Connection refused\n\tIs the server running on that host and accepting TCP/IP"
        " connections?"
    )
    return sa.exc.OperationalError("connect", {}, orig)


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds


async def test_the_wait_backs_off_and_uses_the_database_once_it_answers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    opened = object()
    attempts: list[str] = []

    def opener(url: str, fsync: bool) -> Store:
        attempts.append(url)
        if len(attempts) < 5:
            raise _refused()
        return cast(Store, opened)

    url = "postgresql://app:hunter2@10.0.0.9:5432/ws"
    with caplog.at_level(logging.WARNING, "waystation.store.connect"):
        store = await open_store(url, wait=60, opener=opener, sleep=clock.sleep, clock=clock)
    assert store is opened
    assert clock.slept == [1, 2, 4, 8]
    messages = [r.getMessage() for r in caplog.records]
    assert messages[2] == (
        "waiting for the database at postgresql://app@10.0.0.9:5432/ws (attempt 3):"
        " connection refused; retrying in 4 s"
    )
    assert len(messages) == 4 and "hunter2" not in " ".join(messages)


async def test_the_wait_is_cut_to_what_is_left_then_gives_up() -> None:
    clock = FakeClock()

    def opener(url: str, fsync: bool) -> Store:
        clock.now += 0.5  # each attempt takes a while
        raise _refused()

    url = "postgresql://app@10.0.0.9/ws"
    with pytest.raises(DatabaseUnreachable) as failed:
        await open_store(url, wait=20, opener=opener, sleep=clock.sleep, clock=clock)
    assert clock.slept == [1, 2, 4, 8, 2.5]  # 15 s is the most; 20 s in all
    assert str(failed.value) == (
        "gave up waiting for the database at postgresql://app@10.0.0.9/ws after 6 attempts"
        " in 20 s (--db-wait): connection refused"
    )
    no_wait = FakeClock()
    with pytest.raises(DatabaseUnreachable, match="after 1 attempt in 0 s"):
        await open_store(url, wait=0, opener=opener, sleep=no_wait.sleep, clock=no_wait)
    assert no_wait.slept == []


async def test_sqlite_is_not_waited_for() -> None:
    clock = FakeClock()

    def opener(url: str, fsync: bool) -> Store:
        orig = sqlite3.OperationalError("unable to open database file")
        raise sa.exc.OperationalError("connect", {}, orig)

    with pytest.raises(DatabaseUnreachable, match="cannot connect to the database at sqlite"):
        await open_store("sqlite:////x/y.db", opener=opener, sleep=clock.sleep, clock=clock)
    assert clock.slept == []


async def test_a_database_host_that_never_answers_is_an_attempt_that_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A connection the kernel accepts but nobody answers would hold an attempt for
    as long as the host stays silent: each one is bounded, and the wait goes on."""
    monkeypatch.setattr("waystation.store.database.PG_CONNECT_TIMEOUT", 1)
    monkeypatch.delenv("PGCONNECT_TIMEOUT", raising=False)
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()  # never accepted: the startup packet gets no answer
        url = f"postgresql://app@127.0.0.1:{silent.getsockname()[1]}/ws"
        clock = FakeClock()
        with pytest.raises(DatabaseUnreachable, match=r"after 2 attempts in 1 s.*timeout"):
            await open_store(url, wait=1, sleep=clock.sleep, clock=clock)


def test_server_keys_on_a_bad_or_missing_database_is_one_line(tmp_path: Path) -> None:
    unsupported = waystation("server", "keys", "rotate", "--db", "mysql://root:hunter2@x/db")
    assert unsupported.returncode == 2, t.show(unsupported)
    assert lines(unsupported.stderr) == [
        "error: unsupported database URL 'mysql://root@x/db': use sqlite:///PATH or postgresql://..."
    ]
    with closed_port() as port:
        down = waystation("server", "keys", "list", "--db", f"postgresql://a:b@127.0.0.1:{port}/w")
    assert down.returncode == 1, t.show(down)
    assert lines(down.stderr) == [
        f"error: cannot connect to the database at postgresql://a@127.0.0.1:{port}/w:"
        " connection refused"
    ]


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "Multiple connection attempts failed. All failures were:\n- host: 'localhost',"
            " port: '1', hostaddr: '::1': connection failed: connection to server at \"::1\","
            " port 1 failed: Connection refused\n\tIs the server running on that host and"
            " accepting TCP/IP connections?\n- host: 'localhost', port: '1', hostaddr:"
            " '127.0.0.1': connection failed: connection to server at \"127.0.0.1\", port 1"
            " failed: Connection refused\n\tIs the server running on that host and accepting"
            " TCP/IP connections?",
            "connection refused",
        ),
        (
            "failed to resolve host 'db.invalid': [Errno -2] Name or service not known",
            "failed to resolve host 'db.invalid': [Errno -2] Name or service not known",
        ),
        (
            'connection failed: connection to server at "10.0.0.9", port 5432 failed:'
            " FATAL:  the database system is starting up",
            "the database system is starting up",
        ),
    ],
)
def test_why_a_connection_failed_is_one_short_line(message: str, expected: str) -> None:
    failure = sa.exc.OperationalError("connect", {}, psycopg.OperationalError(message))
    assert reason(failure) == expected
    assert retryable("postgresql://a@h/d", failure)  # none of these is final


def test_durations_are_go_durations_or_seconds() -> None:
    for given in ("90", "1.5", "1m30s", "0"):
        assert settings_of("--db-wait", given)["settings"]["db-wait"]["value"] == given
    refused = {
        ("--db-wait", "-1s"): "--db-wait: must be zero or more seconds",
        ("--ack-timeout", "0"): "--ack-timeout: must be positive",
        ("--poll-interval", "inf"): "--poll-interval: must be positive",
        ("--hang-timeout", "soon"): "--hang-timeout: time: invalid duration",
    }
    for args, message in refused.items():
        result = waystation("server", "config", *args)
        assert result.returncode == 2, t.show(result)
        assert lines(result.stderr)[0].startswith(f"error: {message}"), t.show(result)
    from_env = waystation("server", "config", env={"WAYSTATION_DB_WAIT": "later"})
    assert from_env.returncode == 2
    assert lines(from_env.stderr)[0].startswith("error: WAYSTATION_DB_WAIT: time: invalid")
