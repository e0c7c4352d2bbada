"""Request bodies that do not parse: INVALID_ARGUMENT on every method, no traceback.

Every method of every service we serve (read from the descriptors, so a new RPC
is covered without touching this file) gets raw bytes over real gRPC: corrupt
wire format, and a string field with bad UTF-8, with and without a token. The
guard answers first (UNAUTHENTICATED without a token on guarded methods); then
INVALID_ARGUMENT names the message type and the reason. The log gets one
rate-limited line per cause and never a traceback. One SQLite server: the
backends play no part in parsing.
"""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor_pool, message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor, MethodDescriptor
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import DecodeError
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from hypothesis import HealthCheck, given
from hypothesis import settings as fuzzing
from hypothesis import strategies as st

from waystation import testing as t
from waystation.core.settings import ServerSettings, sqlite_url
from waystation.logs import limited
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.server.app import SERVICES, RunningServer
from waystation.server.auth import PUBLIC_METHODS, PUBLIC_PREFIXES

INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
BROKEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
# Ours, and health and reflection: public, so anyone could flood the log through them.
SERVED = (*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME)
METHODS = [m for name in SERVED for m in descriptor_pool.Default().FindServiceByName(name).methods]
CORRUPT = b"\xff\xff\xff"  # a tag whose varint never ends
CORRUPT_REASON = "wire format was corrupt"
UTF8_REASON = "string field had bad UTF-8"
Status = tuple[grpc.StatusCode, str]


@pytest.fixture
def backend_url(tmp_path: Path) -> str:
    return sqlite_url(tmp_path / "waystation.db")


@pytest.fixture
def fake_clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The shared limiter on a clock that moves only when the test says so, with
    no windows left from earlier tests."""
    now = [0.0]
    monkeypatch.setattr(limited, "clock", lambda: now[0])
    monkeypatch.setattr(limited, "_windows", {})
    return now


# -- helpers ---------------------------------------------------------------------------


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def parse_error(descriptor: Descriptor, raw: bytes) -> str:
    """Why `raw` does not parse as `descriptor` ("" if it does)."""
    try:
        message_factory.GetMessageClass(descriptor).FromString(raw)
    except DecodeError as exc:
        return str(exc)
    return ""


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def bad_utf8(descriptor: Descriptor, depth: int = 0) -> bytes | None:
    """A body whose only flaw is a string field (possibly nested) holding bad
    UTF-8; None if no such field is in reach (google.protobuf.Empty)."""
    for field in descriptor.fields:
        if field.type == FieldDescriptor.TYPE_STRING:
            candidate = _field(field.number, b"\xff\xfe")
        elif field.message_type is not None and depth < 4:
            inner = bad_utf8(field.message_type, depth + 1)
            if inner is None:
                continue
            candidate = _field(field.number, inner)
        else:
            continue
        if "UTF-8" in parse_error(descriptor, candidate):
            return candidate
    return None


async def send_raw(
    channel: aio.Channel,
    method: MethodDescriptor,
    messages: Sequence[bytes],
    metadata: Sequence[tuple[str, str]] = (),
    timeout: float = 60,
) -> Status:
    """Call `method` with raw request bytes (no serializer); its final status."""
    path = path_of(method)
    md = aio.Metadata(*metadata)
    raw = {"request_serializer": None, "response_deserializer": None}
    try:
        if not method.client_streaming and not method.server_streaming:
            await channel.unary_unary(path, **raw)(messages[0], metadata=md, timeout=timeout)
        elif not method.client_streaming:
            responses = channel.unary_stream(path, **raw)(messages[0], metadata=md, timeout=timeout)
            async for _ in responses:
                pass
        elif not method.server_streaming:
            await channel.stream_unary(path, **raw)(iter(messages), metadata=md, timeout=timeout)
        else:
            call = channel.stream_stream(path, **raw)(iter(messages), metadata=md, timeout=timeout)
            async for _ in call:
                pass
    except aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def is_public(method: MethodDescriptor) -> bool:
    path = path_of(method)
    return path in PUBLIC_METHODS or path.startswith(PUBLIC_PREFIXES)


def invalid(method: MethodDescriptor, reason: str) -> Status:
    return INVALID_ARGUMENT, f"request body is not a valid {method.input_type.full_name}: {reason}"


async def assert_healthy(channel: aio.Channel) -> None:
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    await vs_grpc.VagrantStub(channel).ListBasis(Empty(), timeout=30)


def assert_no_traceback(
    caplog: pytest.LogCaptureFixture, capfd: pytest.CaptureFixture[str]
) -> None:
    gc.collect()  # "Task exception was never retrieved" is logged when a task is collected
    with_traceback = [r.getMessage() for r in caplog.records if r.exc_info]
    assert not with_traceback
    assert "Traceback" not in caplog.text
    assert "Traceback" not in capfd.readouterr().err


@pytest.fixture
async def plain(server: RunningServer) -> AsyncIterator[aio.Channel]:
    async with aio.insecure_channel(server.address) as ch:
        yield ch


# -- every method -----------------------------------------------------------------------


async def test_every_method_answers_invalid_argument_after_the_guard(
    server: RunningServer,
    token: str,
    channel: aio.Channel,
    plain: aio.Channel,
    fake_clock: list[float],
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    caplog.set_level(logging.INFO)
    # The daemon identity lets AcquireJobWithCancel get as far as reading.
    with_token = [("authorization", token), *t.daemon_metadata()]
    cases: list[tuple[MethodDescriptor, bytes, str]] = []
    for method in METHODS:
        assert "wire format was corrupt" in parse_error(method.input_type, CORRUPT).lower()
        cases.append((method, CORRUPT, CORRUPT_REASON))
        body = bad_utf8(method.input_type)
        if body is not None:
            cases.append((method, body, UTF8_REASON))
    assert len(METHODS) >= 65 + 3
    # Most requests have a string field; Empty and a few others have none in reach.
    assert sum(reason == UTF8_REASON for _, _, reason in cases) >= 40

    # Concurrently, as a fuzzing client would; the deadline only bounds a stuck server.
    with_results = await asyncio.gather(
        *(send_raw(plain, m, [body], with_token) for m, body, _ in cases)
    )
    without_results = await asyncio.gather(*(send_raw(plain, m, [body]) for m, body, _ in cases))

    wrong = {}
    refused = 0
    for (method, _, reason), got_with, got_without in zip(
        cases, with_results, without_results, strict=True
    ):
        if got_with != invalid(method, reason):
            wrong[f"{method.name} ({reason}, token)"] = got_with
        if is_public(method):
            want_without = invalid(method, reason)
        else:
            want_without = (UNAUTHENTICATED, "Authorization token is not supplied")
            refused += 1
        if got_without != want_without:
            wrong[f"{method.name} ({reason}, no token)"] = got_without
    assert not wrong

    # One line per cause, however many calls: two parse errors and one refusal.
    def lines(logger: str) -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.name == logger]

    undecodable = lines("waystation.server.decoding")
    assert sorted(r.getMessage().rpartition(": ")[2] for r in undecodable) == sorted(
        [CORRUPT_REASON, UTF8_REASON]
    )
    for record in undecodable:
        assert record.__dict__["code"] == "INVALID_ARGUMENT"
        assert record.__dict__["method"] in {path_of(m) for m in METHODS}
        assert record.__dict__["peer"].startswith(("ipv4:127.0.0.1:", "ipv6:"))
    [refusal] = lines("waystation.server.errors")
    assert refusal.__dict__["code"] == "UNAUTHENTICATED"
    assert refusal.__dict__["peer"] in refusal.getMessage()
    assert refusal.__dict__["method"] in refusal.getMessage()

    # A window later, the next line of a cause counts what was held back.
    fake_clock[0] += limited.interval
    corrupt_calls = sum(reason == CORRUPT_REASON for _, _, reason in cases)
    public_corrupt = sum(reason == CORRUPT_REASON and is_public(m) for m, _, reason in cases)
    get_job = vs.DESCRIPTOR.services_by_name["Vagrant"].methods_by_name["GetJob"]
    assert await send_raw(plain, get_job, [CORRUPT], with_token) == invalid(get_job, CORRUPT_REASON)
    last = lines("waystation.server.decoding")[-1]
    assert last.__dict__["suppressed"] == corrupt_calls + public_corrupt - 1
    assert f"and {corrupt_calls + public_corrupt - 1} more like it" in last.getMessage()
    assert await send_raw(plain, get_job, [CORRUPT]) == (
        UNAUTHENTICATED,
        "Authorization token is not supplied",
    )
    assert lines("waystation.server.errors")[-1].__dict__["suppressed"] == refused - 1

    assert_no_traceback(caplog, capfd)
    await assert_healthy(channel)


# -- a bad message in the middle of a stream -------------------------------------------


def vagrant_method(name: str) -> MethodDescriptor:
    return vs.DESCRIPTOR.services_by_name["Vagrant"].methods_by_name[name]


async def test_bad_message_mid_stream_ends_the_call(
    server: RunningServer,
    settings: ServerSettings,
    token: str,
    channel: aio.Channel,
    plain: aio.Channel,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    md = [("authorization", token)]
    # RunnerConfig reads after its first message in a task of its own.
    config = vagrant_method("RunnerConfig")
    opened = vs.RunnerConfigRequest(
        open=vs.RunnerConfigRequest.Open(runner=vs.Runner(id="r-mid"))
    ).SerializeToString()
    assert await send_raw(plain, config, [opened, CORRUPT], md) == invalid(config, CORRUPT_REASON)

    # RestoreSnapshot reads in the handler itself; its partial file goes.
    admin_service = descriptor_pool.Default().FindServiceByName("waystation.v1.Admin")
    restore = admin_service.methods_by_name["RestoreSnapshot"]
    start = vs.RestoreSnapshotRequest(open=vs.RestoreSnapshotRequest.Open()).SerializeToString()
    chunk = vs.RestoreSnapshotRequest(chunk=b"x" * 100).SerializeToString()
    utf8 = bad_utf8(restore.input_type)
    body = CORRUPT if utf8 is None else utf8
    reason = CORRUPT_REASON if utf8 is None else UTF8_REASON
    assert await send_raw(plain, restore, [start, chunk, body], md) == invalid(restore, reason)
    assert not list(settings.data_dir.glob("restore-*.partial"))

    # The runner that opened RunnerConfig is disconnected again.
    assert "r-mid" not in server.engine._connected
    assert_no_traceback(caplog, capfd)
    await assert_healthy(channel)


# -- random bodies ----------------------------------------------------------------------


def by_name(service: str, *names: str) -> list[MethodDescriptor]:
    methods = descriptor_pool.Default().FindServiceByName(service).methods_by_name
    return [methods[n] for n in names]


# Every kind of call on every service, with handlers that answer at once when a
# random body happens to parse (none waits for work or for the client).
FUZZED = [
    *by_name(
        "hashicorp.vagrant.Vagrant",
        "GetVersionInfo",
        "QueueJob",
        "UpsertBasis",
        "GetJob",
        "UpsertTarget",
        "ConvertInviteToken",
        "RunnerJobStream",
    ),
    *by_name("provisionerd.ProvisionerDaemon", "UpdateJob", "FailJob"),
    *by_name("waystation.v1.Admin", "RevokeToken", "GetQueuePosition", "RestoreSnapshot"),
    *by_name("waystation.v1.Provisioning", "GetWorkspace", "GetProvisionerJob"),
]


@fuzzing(
    max_examples=150,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(which=st.integers(0, len(FUZZED) - 1), body=st.binary(max_size=80))
async def test_random_bodies_never_break_the_server(
    server: RunningServer,
    token: str,
    plain: aio.Channel,
    caplog: pytest.LogCaptureFixture,
    which: int,
    body: bytes,
) -> None:
    method = FUZZED[which]
    metadata = [("authorization", token), *t.daemon_metadata()]
    code, details = await send_raw(plain, method, [body], metadata)
    assert code not in BROKEN, f"{method.name} {body!r}: {code.name} {details}"
    error = parse_error(method.input_type, body)
    if error:
        assert code == INVALID_ARGUMENT, f"{method.name} {body!r}: {code.name} {details}"
        assert details.startswith(f"request body is not a valid {method.input_type.full_name}: ")
        assert details.rpartition(": ")[2].lower() == error.rpartition(": ")[2].lower()
    assert not [r.getMessage() for r in caplog.records if r.exc_info]


async def test_bad_message_while_a_job_runs_ends_the_stream_not_the_server(
    server: RunningServer,
    token: str,
    channel: aio.Channel,
    plain: aio.Channel,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    vagrant = vs_grpc.VagrantStub(channel)
    runner = t.FakeRunner(channel, "r-bad")
    await runner.register()
    queued = await vagrant.QueueJob(vs.QueueJobRequest(job=t.noop_job("r-bad")))
    requests: asyncio.Queue[bytes | None] = asyncio.Queue()

    async def sent() -> AsyncIterator[bytes]:
        while (item := await requests.get()) is not None:
            yield item

    Req = vs.RunnerJobStreamRequest
    stream = path_of(vagrant_method("RunnerJobStream"))
    call = plain.stream_stream(stream, request_serializer=None, response_deserializer=None)(
        sent(), metadata=aio.Metadata(("authorization", token)), timeout=60
    )
    try:
        await requests.put(Req(request=Req.Request(runner_id="r-bad")).SerializeToString())
        raw = await call.read()
        assert isinstance(raw, bytes)
        assignment = vs.RunnerJobStreamResponse.FromString(raw)
        assert assignment.assignment.job.id == queued.job_id
        await requests.put(Req(ack=Req.Ack()).SerializeToString())
        await requests.put(Req(terminal=t.lines_event("one")).SerializeToString())
        await requests.put(CORRUPT)  # read by the handler's own reader task
        await requests.put(None)
        assert await call.code() == INVALID_ARGUMENT
        want = invalid(vagrant_method("RunnerJobStream"), CORRUPT_REASON)[1]
        assert await call.details() == want
    finally:
        call.cancel()
        await runner.close()
    # As when a runner leaves mid-job: the job stays RUNNING until the heartbeat timeout.
    job = await vagrant.GetJob(vs.GetJobRequest(job_id=queued.job_id))
    assert job.state == vs.Job.RUNNING
    assert_no_traceback(caplog, capfd)
    await assert_healthy(channel)
