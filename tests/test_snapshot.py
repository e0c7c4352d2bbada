"""Snapshots (waystation.v1.Admin CreateSnapshot / RestoreSnapshot) over real
gRPC: the encoding read back independently, a restore staged and applied at
the next start, hostile input refused with nothing staged. Both backends."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty
from grpc import aio
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from waystation import testing as t
from waystation.client import Connection
from waystation.core.settings import ServerSettings, sqlite_url
from waystation.errors import InvalidArgument
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc
from waystation.server.app import RunningServer, start
from waystation.store import Store, schema, snapshot
from waystation.store.snapshot import staged

if TYPE_CHECKING:
    from waystation.protocol.vagrant_server_pb2_grpc import VagrantAsyncStub as Stub
    from waystation.protocol.waystation.v1.admin_pb2_grpc import AdminAsyncStub as Admin

Snap = vs.Snapshot
Req = vs.RestoreSnapshotRequest


async def take_snapshot(admin: Admin) -> bytes:
    responses = [r async for r in admin.CreateSnapshot(Empty())]
    assert responses[0].WhichOneof("event") == "open"
    assert all(r.WhichOneof("event") == "chunk" for r in responses[1:])
    return b"".join(r.chunk for r in responses[1:])


def _uvarint(data: bytes, pos: int) -> tuple[int, int]:
    """(value, position after it): the test's own reader, not the server's."""
    value = shift = 0
    while True:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def messages(data: bytes) -> list[bytes]:
    """The snapshot's uncompressed, delimited messages, each with its length prefix."""
    raw = gzip.decompress(data)
    out, pos = [], 0
    while pos < len(raw):
        length, start = _uvarint(raw, pos)
        out.append(raw[pos : start + length])
        pos = start + length
    return out


def body(framed: bytes) -> bytes:
    _, start = _uvarint(framed, 0)
    return framed[start:]


async def send(admin: Admin, *events: Req) -> Any:
    async def requests() -> AsyncIterator[Req]:
        for event in events:
            yield event

    return await admin.RestoreSnapshot(requests())


def restore_events(data: bytes, exit: bool = False, size: int = 1000) -> list[Req]:
    chunks = [data[i : i + size] for i in range(0, len(data), size)]
    return [Req(open=Req.Open(exit=exit)), *(Req(chunk=c) for c in chunks)]


async def test_the_snapshot_is_waypoints_encoding(server: RunningServer, admin: Admin) -> None:
    anyone = vs.Ref.Runner(any=vs.Ref.RunnerAny())
    many = [vs.ConfigVar(name=f"v{i:04}", value="x", runner=anyone) for i in range(1201)]
    await admin.ConfigSet(vs.ConfigSetRequest(variables=many))
    data = await take_snapshot(admin)
    framed = messages(data)
    header = Snap.Header.FromString(body(framed[0]))
    assert header.format == Snap.Header.BOLT and header.version.version
    chunks = [Snap.BoltChunk.FromString(body(m)) for m in framed[1:-1]]
    assert chunks[-1].final and not any(c.final for c in chunks[:-1])
    assert chunks[0].bucket == "waystation.snapshot"
    assert "auth_keys" in {c.bucket for c in chunks}  # the signing keys are in it
    # A table's rows go in chunks of at most 500, in key order (a map has none inside).
    config = [c for c in chunks if c.bucket == "config_vars"]
    assert [len(c.items) for c in config] == [500, 500, 201]
    names = [sorted(json.loads(v)["name"] for v in c.items.values()) for c in config]
    assert [n for chunk in names for n in chunk] == [v.name for v in many]
    trailer = Snap.Trailer.FromString(body(framed[-1]))
    assert trailer.sha256 == hashlib.sha256(b"".join(framed[:-1])).hexdigest()


async def test_a_restore_replaces_the_store_at_the_next_start(
    server: RunningServer, settings: ServerSettings, token: str, vagrant: Stub, admin: Admin
) -> None:
    kept = await vagrant.UpsertBasis(vs.UpsertBasisRequest(basis=t.basis("kept")))
    job = await vagrant.QueueJob(vs.QueueJobRequest(job=t.noop_job()))
    anyone = vs.Ref.Runner(any=vs.Ref.RunnerAny())
    many = [vs.ConfigVar(name=f"v{i:04}", value=str(i), runner=anyone) for i in range(700)]
    await admin.ConfigSet(vs.ConfigSetRequest(variables=many))  # more than one chunk
    data = await take_snapshot(admin)

    # After the snapshot: one basis more, the job cancelled.
    later = await vagrant.UpsertBasis(vs.UpsertBasisRequest(basis=t.basis("later")))
    await vagrant.CancelJob(vs.CancelJobRequest(job_id=job.job_id))
    assert await send(admin, *restore_events(data)) == Empty()
    assert staged(settings.data_dir).exists()
    # Staged, not applied: the running server still has what it had.
    assert (await vagrant.GetJob(vs.GetJobRequest(job_id=job.job_id))).state == vs.Job.ERROR
    await server.stop(1)

    restarted = await start(settings)
    try:
        async with Connection(restarted.address, token).aio_channel() as channel:
            stub = vs_grpc.VagrantStub(channel)
            names = {b.name for b in (await stub.ListBasis(Empty())).basis}
            assert kept.basis.name in names and later.basis.name not in names
            again = await stub.GetJob(vs.GetJobRequest(job_id=job.job_id))
            assert again.state == vs.Job.QUEUED
            restored = await admin_grpc.AdminStub(channel).ConfigGet(
                vs.ConfigGetRequest(runner=vs.Ref.RunnerId(id="any-runner"))
            )
            assert [(v.name, v.value) for v in restored.variables] == [
                (v.name, v.value) for v in many
            ]
            # The snapshot's signing keys and tokens came with it: the old token works.
            assert await take_snapshot(admin_grpc.AdminStub(channel))
    finally:
        await restarted.stop(1)
    assert not staged(settings.data_dir).exists()
    assert staged(settings.data_dir).with_name("restore.snapshot.applied").exists()


def _tampered(data: bytes) -> bytes:
    raw = bytearray(gzip.decompress(data))
    raw[len(raw) // 2] ^= 0x01
    return gzip.compress(bytes(raw))


@pytest.mark.parametrize(
    ("damage", "fragment"),
    [
        (lambda d: d[: len(d) // 2], "snapshot: unreadable"),
        (_tampered, "snapshot:"),
        (lambda d: b"not a snapshot at all", "snapshot: unreadable"),
        (lambda d: gzip.compress(b""), "no header"),
    ],
    ids=["truncated", "tampered", "garbage", "empty"],
)
async def test_a_damaged_snapshot_is_refused_and_nothing_is_staged(
    server: RunningServer, settings: ServerSettings, admin: Admin, damage: Any, fragment: str
) -> None:
    data = damage(await take_snapshot(admin))
    await t.expect_status(
        send(admin, *restore_events(data)), grpc.StatusCode.INVALID_ARGUMENT, fragment
    )
    assert not staged(settings.data_dir).exists()
    assert not list(settings.data_dir.glob("restore-*.partial"))


async def test_events_out_of_order_are_refused(
    server: RunningServer, settings: ServerSettings, admin: Admin
) -> None:
    data = await take_snapshot(admin)
    await t.expect_status(
        send(admin, Req(chunk=data)), grpc.StatusCode.FAILED_PRECONDITION, "first message"
    )
    await t.expect_status(
        send(admin, Req(open=Req.Open()), Req(open=Req.Open())),
        grpc.StatusCode.FAILED_PRECONDITION,
        "only chunks",
    )
    await t.expect_status(send(admin), grpc.StatusCode.FAILED_PRECONDITION, "first message")
    assert not staged(settings.data_dir).exists()


async def test_open_exit_asks_the_server_to_shut_down(server: RunningServer, admin: Admin) -> None:
    assert not server.exit_requested.is_set()
    await send(admin, *restore_events(await take_snapshot(admin)))
    assert not server.exit_requested.is_set()
    await send(admin, *restore_events(await take_snapshot(admin), exit=True))
    assert server.exit_requested.is_set()


async def test_a_snapshot_of_another_schema_revision_is_refused(
    server: RunningServer, settings: ServerSettings, admin: Admin
) -> None:
    framed = messages(await take_snapshot(admin))
    meta = Snap.BoltChunk.FromString(body(framed[1]))
    meta.items["revision"] = b"0000future"
    data = meta.SerializeToString()
    assert len(data) < 128  # a one-byte length prefix
    framed[1] = bytes([len(data)]) + data
    digest = hashlib.sha256(b"".join(framed[:-1])).hexdigest()
    trailer = Snap.Trailer(sha256=digest).SerializeToString()
    forged = gzip.compress(b"".join(framed[:-1]) + bytes([len(trailer)]) + trailer)
    await t.expect_status(
        send(admin, *restore_events(forged)), grpc.StatusCode.INVALID_ARGUMENT, "0000future"
    )
    assert not staged(settings.data_dir).exists()


async def test_a_bad_staged_file_stops_the_start_with_a_clear_error(
    server: RunningServer, settings: ServerSettings
) -> None:
    await server.stop(1)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    staged(settings.data_dir).write_bytes(b"left here by hand, not a snapshot")
    with pytest.raises(OSError, match=r"cannot restore .*move it away"):
        await start(replace(settings))
    assert staged(settings.data_dir).exists()  # left for the operator


async def test_rows_that_break_constraints_stop_the_start_and_change_nothing(
    server: RunningServer, settings: ServerSettings, token: str, vagrant: Stub, admin: Admin
) -> None:
    await vagrant.UpsertBasis(vs.UpsertBasisRequest(basis=t.basis("before")))
    framed = messages(await take_snapshot(admin))
    # The same server flag twice: each chunk is fine alone, together they are not.
    twice = Snap.BoltChunk(bucket="server_flags", items={'["x"]': b'{"name":"x","set_at":1}'})
    data = twice.SerializeToString()
    extra = bytes([len(data)]) + data
    # Right after the snapshot's own server_flags chunk, where its order allows them.
    at = 1 + next(
        i for i, m in enumerate(framed) if b"server_flags" in body(m) and b"bootstrapped" in m
    )
    framed[at:at] = [extra, extra]
    digest = hashlib.sha256(b"".join(framed[:-1])).hexdigest()
    trailer = Snap.Trailer(sha256=digest).SerializeToString()
    forged = gzip.compress(b"".join(framed[:-1]) + bytes([len(trailer)]) + trailer)
    assert await send(admin, *restore_events(forged)) == Empty()  # it reads well
    await server.stop(1)

    with pytest.raises(OSError, match="break the schema's constraints"):
        await start(settings)
    staged(settings.data_dir).rename(settings.data_dir / "set-aside")
    again = await start(settings)
    try:
        async with Connection(again.address, token).aio_channel() as channel:
            listed = await vs_grpc.VagrantStub(channel).ListBasis(Empty())
            assert [b.name for b in listed.basis] == ["before"]
    finally:
        await again.stop(1)


async def test_a_sqlite_snapshot_restores_into_postgresql(
    tmp_path: Path, postgres_url: str
) -> None:
    """Rows are backend-neutral: the way from the embedded store to a shared one."""
    lite = ServerSettings(listen="127.0.0.1:0", data_dir=tmp_path / "lite", shutdown_grace=1)
    source = await start(lite)
    try:
        async with aio.insecure_channel(source.address) as anonymous:
            token = (await vs_grpc.VagrantStub(anonymous).BootstrapToken(Empty())).token
        async with Connection(source.address, token).aio_channel() as channel:
            vagrant = vs_grpc.VagrantStub(channel)
            await vagrant.UpsertBasis(vs.UpsertBasisRequest(basis=t.basis("moved")))
            job = await vagrant.QueueJob(vs.QueueJobRequest(job=t.noop_job()))
            data = await take_snapshot(admin_grpc.AdminStub(channel))
    finally:
        await source.stop(1)
    shared = replace(lite, data_dir=tmp_path / "shared", db_url=postgres_url)
    shared.data_dir.mkdir()
    staged(shared.data_dir).write_bytes(data)  # staged by hand, as an operator may
    target = await start(shared)
    try:
        async with Connection(target.address, token).aio_channel() as channel:
            vagrant = vs_grpc.VagrantStub(channel)
            assert [b.name for b in (await vagrant.ListBasis(Empty())).basis] == ["moved"]
            moved = await vagrant.GetJob(vs.GetJobRequest(job_id=job.job_id))
            assert moved.state == vs.Job.QUEUED
    finally:
        await target.stop(1)


# -- the CLI ---------------------------------------------------------------------------


@pytest.fixture
def process(tmp_path: Path) -> Iterator[t.ServerProcess]:
    server = t.ServerProcess(tmp_path / "data")
    server.start()
    yield server
    if server.proc is not None and server.proc.poll() is None:
        server.stop()


def cli(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYSTATION_")}
    return subprocess.run(
        [sys.executable, "-m", "waystation.cli.main", "--address", address, *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_cli_snapshot_create_and_restore_with_exit(
    process: t.ServerProcess, tmp_path: Path
) -> None:
    path = tmp_path / "store.snapshot"
    made = cli(process.address, "snapshot", "create", str(path))
    assert made.returncode == 0, t.show(made)
    assert "snapshot written to" in made.stdout and path.stat().st_size > 0
    assert not path.with_name("store.snapshot.partial").exists()

    missing = cli(process.address, "snapshot", "restore", str(tmp_path / "nope"))
    t.assert_cli_error(missing, "cannot read")

    damaged = tmp_path / "damaged"
    damaged.write_bytes(path.read_bytes()[:50])
    refused = cli(process.address, "snapshot", "restore", str(damaged))
    t.assert_cli_error(refused, "snapshot: unreadable", "INVALID_ARGUMENT")

    restored = cli(process.address, "snapshot", "restore", "--exit", str(path))
    assert restored.returncode == 0, t.show(restored)
    assert "it has shut down" in restored.stdout
    assert process.proc is not None
    assert process.proc.wait(60) == 0  # the server exited on its own, cleanly
    assert "shutting down, as the restore asked" in process.output()

    process.start()  # applies it
    assert "store restored" in process.output()


# -- hostile files, fuzzed -------------------------------------------------------------


def test_any_damage_to_a_snapshot_is_invalid_argument_and_nothing_else(tmp_path: Path) -> None:
    """Truncations, flipped bytes and random data: verify_file answers InvalidArgument
    (what the RPC turns into INVALID_ARGUMENT), never another error."""
    db = Store.open(sqlite_url(tmp_path / "fuzz.db"))._db
    try:
        db.run_sync(
            lambda conn: conn.execute(schema.server_flags.insert(), {"name": "x", "set_at": 1})
        )
        spool = io.BytesIO()
        db.run_sync(lambda conn: snapshot.write(conn, spool, vs.VersionInfo(version="t")))
        good = spool.getvalue()
        plain = gzip.decompress(good)
        path = tmp_path / "candidate"
        path.write_bytes(good)
        assert db.run_sync(lambda conn: snapshot.verify_file(conn, path)) >= 1

        @settings(max_examples=300, deadline=None)
        @given(
            st.one_of(
                st.integers(0, len(good) - 1).map(lambda n: good[:n]),
                # Not bytes 4-9 of the gzip header (mtime, flags, OS): readers ignore them.
                st.tuples(
                    st.integers(0, len(good) - 1).filter(lambda i: not 4 <= i <= 9),
                    st.integers(1, 255),
                ).map(lambda f: good[: f[0]] + bytes([good[f[0]] ^ f[1]]) + good[f[0] + 1 :]),
                st.binary(max_size=512),
                st.binary(max_size=512).map(gzip.compress),
            )
        )
        def damaged_is_refused(data: bytes) -> None:
            # Deflate ignores the padding bits after a final block: a flip there
            # leaves the same snapshot, which is not damage.
            try:
                same = gzip.decompress(data) == plain
            except Exception:
                same = False
            assume(not same)
            path.write_bytes(data)
            with pytest.raises(InvalidArgument, match=r"^snapshot: "):
                db.run_sync(lambda conn: snapshot.verify_file(conn, path))

        damaged_is_refused()
    finally:
        asyncio.run(db.close())
