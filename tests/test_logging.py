"""The server's log as a service's: JSON lines, rate-limited refusals, token ids
and never tokens (issue #19, 6).

The rate limiter and the JSON formatter are checked on their own; the rest on an
in-process server (SQLite: the backends play no part) and on `waystation server
run --log-format json` as a child process.
"""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import logging
import os
import re
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty
from grpc import aio

from waystation import logs
from waystation import testing as t
from waystation.auth import tokens
from waystation.auth.service import Authenticator
from waystation.core.settings import sqlite_url
from waystation.core.timeouts import Timeouts, now_us
from waystation.logs import JsonFormatter, RateLimitedLog, limited
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.waystation.v1 import admin_pb2 as admin_pb
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc
from waystation.server.app import RunningServer

UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
NOT_SUPPLIED = "Authorization token is not supplied"


@pytest.fixture
def backend_url(tmp_path: Path) -> str:
    return sqlite_url(tmp_path / "waystation.db")


@pytest.fixture
def timeouts() -> Timeouts:
    """A short ack timeout, for a line about jobs it requeued."""
    return Timeouts(poll=0.25, ack=1.0)


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The shared limiter on a clock that moves only when the test says so."""
    now = [0.0]
    monkeypatch.setattr(limited, "clock", lambda: now[0])
    monkeypatch.setattr(limited, "_windows", {})
    return now


@pytest.fixture
async def plain(server: RunningServer) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(server.address) as ch:
        yield ch


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def captured() -> Iterator[list[logging.LogRecord]]:
    """What logger `test.logging` logs, kept apart from everything else."""
    handler = Collect()
    logger = logging.getLogger("test.logging")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    yield handler.records
    logger.removeHandler(handler)


# -- the limiter ------------------------------------------------------------------------


def test_rate_limited_log_one_line_per_cause_per_interval(
    captured: list[logging.LogRecord],
) -> None:
    now = [100.0]
    limiter = RateLimitedLog(interval=5, clock=lambda: now[0])
    logger = logging.getLogger("test.logging")

    def say(cause: str) -> bool:
        return limiter.log(logger, logging.WARNING, cause, "%s happened", cause, peer="p")

    assert say("a")
    assert not any(say("a") for _ in range(9))
    assert say("b")  # another cause has a window of its own
    now[0] += 4.9
    assert not say("a")
    now[0] += 0.1
    assert say("a")
    assert [r.getMessage() for r in captured] == [
        "a happened",
        "b happened",
        "a happened (and 10 more like it since the last such line)",
    ]
    assert [r.__dict__.get("suppressed") for r in captured] == [None, None, 10]
    assert all(r.__dict__["peer"] == "p" for r in captured)
    now[0] += 5
    assert say("a")
    assert "suppressed" not in captured[-1].__dict__  # nothing held back that time


def test_rate_limited_log_is_bounded_in_causes(captured: list[logging.LogRecord]) -> None:
    now = [0.0]
    limiter = RateLimitedLog(interval=5, max_causes=10, clock=lambda: now[0])
    logger = logging.getLogger("test.logging")
    logged = sum(limiter.log(logger, logging.WARNING, n, "cause %d", n) for n in range(1000))
    # Ten causes of their own, then one shared window for all the rest.
    assert logged == 11
    assert len(limiter._windows) <= 11
    now[0] += 5  # expired windows make room again
    assert limiter.log(logger, logging.WARNING, 5000, "cause %d", 5000)
    assert len(limiter._windows) <= 11


def test_rate_limited_log_skips_disabled_levels(captured: list[logging.LogRecord]) -> None:
    limiter = RateLimitedLog()
    logger = logging.getLogger("test.logging")
    logger.setLevel(logging.WARNING)
    assert not limiter.log(logger, logging.INFO, "x", "quiet")
    assert limiter.log(logger, logging.WARNING, "x", "loud")  # no window was taken
    assert [r.getMessage() for r in captured] == ["loud"]


# -- the JSON formatter -----------------------------------------------------------------


def json_line(**extra: Any) -> dict[str, Any]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.logging.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        logger.warning("job %s failed: %s", "j1", 'ünïcode "quoted"\nnext', extra=extra)
    finally:
        logger.removeHandler(handler)
    text = stream.getvalue()
    assert text.count("\n") == 1  # one line, whatever the message holds
    document: dict[str, Any] = json.loads(text)
    return document


def test_json_lines_have_time_level_logger_message_and_fields() -> None:
    line = json_line(job_id="j1", runner_id="r1", code="INTERNAL", method="/x/Y", peer="ipv4:1")
    moment = datetime.datetime.fromisoformat(line["time"])
    assert moment.tzinfo is not None and moment.utcoffset() == datetime.timedelta(0)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"])
    assert abs(moment.timestamp() - time.time()) < 600
    assert line["level"] == "WARNING"
    assert line["logger"] == "test.logging.json"
    assert line["message"] == 'job j1 failed: ünïcode "quoted"\nnext'
    for key, value in {
        "job_id": "j1",
        "runner_id": "r1",
        "code": "INTERNAL",
        "method": "/x/Y",
        "peer": "ipv4:1",
    }.items():
        assert line[key] == value
    # Nothing of LogRecord's own attributes leaks in.
    assert not {"args", "msg", "levelno", "pathname", "created"} & line.keys()


def test_json_line_without_fields_and_with_an_exception() -> None:
    assert set(json_line()) == {"time", "level", "logger", "message"}
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    logger = logging.getLogger("test.logging.json")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("it broke", extra={"value": object()})
    finally:
        logger.removeHandler(handler)
    line = json.loads(stream.getvalue())
    assert "ValueError: boom" in line["exception"]
    assert line["value"].startswith("<object")  # not JSON: as its str


def test_unknown_log_format() -> None:
    with pytest.raises(ValueError, match="unknown log format 'xml'"):
        logs.formatter("xml")


# -- refused calls ----------------------------------------------------------------------


def lines_of(caplog: pytest.LogCaptureFixture, logger: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == logger]


async def test_refused_calls_are_logged_rate_limited_with_method_and_peer(
    server: RunningServer,
    token: str,
    plain: aio.Channel,
    fake_clock: list[float],
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    vagrant = vs_grpc.VagrantStub(plain)
    forged = tokens.encode(tokens.login_token(), "k1", tokens.new_key())
    for _ in range(20):
        error = await t.rpc_error(vagrant.ListBasis(Empty()))
        assert (error.code(), error.details()) == (UNAUTHENTICATED, NOT_SUPPLIED)
        error = await t.rpc_error(vagrant.ListBasis(Empty(), metadata=(("authorization", forged),)))
        assert error.code() == UNAUTHENTICATED
        # Refused by the handler rather than the guard.
        error = await t.rpc_error(vagrant.BootstrapToken(Empty()))
        assert error.code() == PERMISSION_DENIED
    refusals = lines_of(caplog, "waystation.server.errors")
    assert len(refusals) == 3  # one a cause
    by_code = {r.__dict__["code"]: r for r in refusals}
    assert set(by_code) == {"UNAUTHENTICATED", "PERMISSION_DENIED"}
    for record in refusals:
        assert record.levelno == logging.WARNING
        assert record.__dict__["peer"].startswith("ipv4:127.0.0.1:")
        assert record.__dict__["peer"] in record.getMessage()
        assert record.__dict__["method"] in record.getMessage()
    guard_lines = [r for r in refusals if r.__dict__["code"] == "UNAUTHENTICATED"]
    assert {r.__dict__["method"] for r in guard_lines} == {"/hashicorp.vagrant.Vagrant/ListBasis"}
    assert "BootstrapToken" in by_code["PERMISSION_DENIED"].__dict__["method"]
    assert token not in caplog.text and forged not in caplog.text

    # The next window's first line counts the ones held back.
    fake_clock[0] += limited.interval
    await t.rpc_error(vagrant.ListBasis(Empty()))
    last = lines_of(caplog, "waystation.server.errors")[-1]
    assert last.__dict__["suppressed"] == 19
    assert NOT_SUPPLIED in last.getMessage() and "19 more" in last.getMessage()


# -- tokens and keys ---------------------------------------------------------------------


async def test_minting_and_revoking_log_the_id_never_the_token(
    server: RunningServer,
    token: str,
    channel: aio.Channel,
    plain: aio.Channel,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    vagrant = vs_grpc.VagrantStub(channel)
    admin = admin_grpc.AdminStub(channel)
    login = (await vagrant.GenerateLoginToken(Empty())).token
    invite = (await vagrant.GenerateInviteToken(vs.InviteTokenRequest(duration="1h"))).token
    converted = (
        await vs_grpc.VagrantStub(plain).ConvertInviteToken(
            vs.ConvertInviteTokenRequest(token=invite)
        )
    ).token
    ids = {text: tokens.token_id_hex(tokens.unverified(text)[0]) for text in (login, invite)}
    ids[converted] = tokens.token_id_hex(tokens.unverified(converted)[0])
    revoked = await admin.RevokeToken(admin_pb.RevokeTokenRequest(token_id=ids[login].upper()))
    assert revoked.revoked
    again = await admin.RevokeToken(admin_pb.RevokeTokenRequest(token_id=ids[login]))
    assert not again.revoked

    minted = [
        r for r in caplog.records if r.name == "waystation.auth.service" and "minted" in r.msg
    ]
    assert [(r.__dict__["token_id"], r.__dict__["minted_by"]) for r in minted] == [
        (ids[login], "login"),
        (ids[invite], "invite"),
        (ids[converted], "convert"),
    ]
    assert minted[1].__dict__["token_kind"] == "invite"
    assert minted[2].__dict__["invite_id"] == ids[invite]
    assert all(r.levelno == logging.INFO and r.__dict__["key_id"] == "k1" for r in minted)
    for text, token_id in ids.items():
        assert token_id in caplog.text
        assert text not in caplog.text
    assert token not in caplog.text
    revocations = [r for r in caplog.records if r.__dict__.get("token_id") == ids[login]][1:]
    assert [r.getMessage() for r in revocations] == [
        f"revoked token {ids[login]}",
        f"token {ids[login]} was already revoked",
    ]


async def test_key_rotation_and_retirement_are_logged(
    server: RunningServer, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    authenticator = Authenticator(server.store)  # as every replica's guard sees the keys
    await authenticator._active_keys(fresh=True)
    assert not caplog.records  # the first look is no change
    assert await server.store.key_rotate(now_us()) == "k2"
    await authenticator._active_keys(fresh=True)
    await server.store.key_retire("k1", now_us())
    await authenticator._active_keys(fresh=True)
    keyed = [(r.getMessage(), r.__dict__["key_id"]) for r in caplog.records]
    assert keyed == [("signing key k2 is active", "k2"), ("signing key k1 was retired", "k1")]
    assert all(r.levelno == logging.INFO for r in caplog.records)


async def test_timer_lines_carry_the_job_ids(
    server: RunningServer, token: str, channel: aio.Channel, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    vagrant = vs_grpc.VagrantStub(channel)
    runner = t.FakeRunner(channel, "r-slow")
    await runner.register()
    try:
        queued = await vagrant.QueueJob(vs.QueueJobRequest(job=t.noop_job("r-slow")))
        stream = runner.job_stream()
        await stream.request()
        assert (await stream.assignment()).id == queued.job_id  # and never acked
        await t.wait_for_state(vagrant, queued.job_id, vs.Job.QUEUED, timeout=60)
        stream.call.cancel()
    finally:
        await runner.close()
    # The line follows the requeue's commit: wait for it too.
    deadline = time.monotonic() + 60
    while not (lines := [r for r in caplog.records if "ack timeout" in r.getMessage()]):
        assert time.monotonic() < deadline, "no line about the requeue"
        await asyncio.sleep(0.05)
    [line] = lines
    assert line.__dict__["job_ids"] == [queued.job_id]
    assert json.loads(JsonFormatter().format(line))["job_ids"] == [queued.job_id]


# -- the server process with --log-format json -----------------------------------------


def run_server(data_dir: Path, *args: str, env: dict[str, str] | None = None) -> Any:
    cmd = [sys.executable, "-m", "waystation.cli.main", "server", "run"]
    cmd += ["--listen", "127.0.0.1:0", "--data-dir", str(data_dir), *args]
    return subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env={**os.environ, **(env or {})},
    )


def read_until_listening(proc: Any, timeout: float = 60) -> tuple[str, list[str]]:
    """The address the server listens on, and the lines it wrote until then."""
    lines: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"server exited:\n{''.join(lines)}")
        lines.append(line)
        found = re.search(r"listening on (\d+\.\d+\.\d+\.\d+:\d+)", line)
        if found:
            return found.group(1), lines
    raise AssertionError(f"server did not start:\n{''.join(lines)}")


def stop(proc: Any, lines: list[str]) -> list[str]:
    proc.terminate()
    rest: str = proc.communicate(timeout=60)[0]
    return lines + rest.splitlines(keepends=True)


async def test_server_process_logs_json_lines(tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    proc = run_server(data_dir, "--log-format", "json")
    lines: list[str] = []
    try:
        address, lines = read_until_listening(proc)
        async with aio.insecure_channel(address) as ch:
            vagrant = vs_grpc.VagrantStub(ch)
            bootstrap = (await vagrant.BootstrapToken(Empty())).token
            for _ in range(5):
                error = await t.rpc_error(vagrant.ListBasis(Empty()))
                assert error.code() == UNAUTHENTICATED
            raw = ch.unary_unary(
                "/hashicorp.vagrant.Vagrant/GetJob",
                request_serializer=None,
                response_deserializer=None,
            )
            with pytest.raises(aio.AioRpcError) as caught:
                await raw(b"\xff\xff\xff", metadata=(("authorization", bootstrap),))
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        lines = stop(proc, lines)
    output = "".join(lines)
    assert bootstrap not in output
    entries = [json.loads(line) for line in lines if line.strip()]  # every line is JSON
    for entry in entries:
        assert {"time", "level", "logger", "message"} <= entry.keys(), entry
        datetime.datetime.fromisoformat(entry["time"])
    assert not [e for e in entries if "exception" in e or "Traceback" in e["message"]]
    minted = [e for e in entries if e["message"].startswith("minted")]
    assert [e["token_id"] for e in minted] == [tokens.token_id_hex(tokens.unverified(bootstrap)[0])]
    refused = [e for e in entries if e.get("code") == "UNAUTHENTICATED"]
    assert len(refused) == 1  # five calls, one line
    assert refused[0]["method"] == "/hashicorp.vagrant.Vagrant/ListBasis"
    assert refused[0]["peer"].startswith("ipv4:127.0.0.1:")
    [undecodable] = [e for e in entries if e.get("code") == "INVALID_ARGUMENT"]
    assert undecodable["method"] == "/hashicorp.vagrant.Vagrant/GetJob"
    assert "hashicorp.vagrant.GetJobRequest" in undecodable["message"]

    # Started again (format from the environment): Alembic says nothing on a start
    # that does not migrate.
    again = run_server(data_dir, env={"WAYSTATION_LOG_FORMAT": "json"})
    lines = []
    try:
        _, lines = read_until_listening(again)
    finally:
        lines = stop(again, lines)
    entries = [json.loads(line) for line in lines if line.strip()]
    assert not [e for e in entries if e["logger"].startswith("alembic")]
    assert any("listening on" in e["message"] for e in entries)
