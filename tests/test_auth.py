"""Authentication end to end: the Guard, the token RPCs, revocation and signing keys.

Every test runs an in-process server (the `server` fixture, auth on) on each
storage backend and speaks to it over real channels: `channel` carries the
bootstrap token, `plain` carries nothing unless a call adds metadata itself.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import base58
import grpc
import pytest
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from waystation import testing as t
from waystation.auth import tokens
from waystation.auth.service import KEY_CACHE_SECONDS
from waystation.client import Connection
from waystation.core.settings import ServerSettings
from waystation.core.timeouts import now_us
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.waystation.v1 import admin_pb2 as admin_pb
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc
from waystation.server.app import RunningServer, start

OK = grpc.StatusCode.OK
UNAUTHENTICATED = grpc.StatusCode.UNAUTHENTICATED
PERMISSION_DENIED = grpc.StatusCode.PERMISSION_DENIED
INVALID_ARGUMENT = grpc.StatusCode.INVALID_ARGUMENT
NOT_SUPPLIED = "Authorization token is not supplied"
BROKEN = (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN)
VAGRANT = vs.DESCRIPTOR.services_by_name["Vagrant"]
SERVICES = (
    VAGRANT,
    *pd.DESCRIPTOR.services_by_name.values(),
    *admin_pb.DESCRIPTOR.services_by_name.values(),
)
METHODS = [m for service in SERVICES for m in service.methods]
PUBLIC = {"GetVersionInfo", "BootstrapToken", "ConvertInviteToken"}
Status = tuple[grpc.StatusCode, str]
Metadata = Sequence[tuple[str, str]]


# -- helpers ---------------------------------------------------------------------------


def path_of(method: MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def empty_request(method: MethodDescriptor) -> Message:
    return message_factory.GetMessageClass(method.input_type)()


async def invoke(
    channel: aio.Channel,
    method: MethodDescriptor,
    request: Message | None = None,
    metadata: Metadata = (),
    timeout: float = 3.0,
) -> Status:
    """Call any method generically; its final status (OK if it succeeded)."""
    request = request if request is not None else empty_request(method)
    response = message_factory.GetMessageClass(method.output_type)
    kw: dict[str, Any] = {
        "request_serializer": type(request).SerializeToString,
        "response_deserializer": response.FromString,
    }
    md = aio.Metadata(*metadata)
    path = path_of(method)
    try:
        if not method.client_streaming and not method.server_streaming:
            await channel.unary_unary(path, **kw)(request, metadata=md, timeout=timeout)
        elif not method.client_streaming:
            async for _ in channel.unary_stream(path, **kw)(request, metadata=md, timeout=timeout):
                pass
        elif not method.server_streaming:
            await channel.stream_unary(path, **kw)(iter([request]), metadata=md, timeout=timeout)
        else:
            call = channel.stream_stream(path, **kw)(iter([request]), metadata=md, timeout=timeout)
            async for _ in call:
                pass
    except aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, ""


def method(name: str) -> MethodDescriptor:
    return VAGRANT.methods_by_name[name]


async def list_with(address: str, text: str | None, header: str | None = None) -> Status:
    """ListBasis on a fresh channel sending `text` (if any) as the token."""
    metadata: list[tuple[str, str]] = []
    if text is not None:
        metadata.append(("authorization", text))
    if header is not None:
        metadata.append(("client-api-protocol", header))
    async with aio.insecure_channel(address) as ch:
        return await invoke(ch, method("ListBasis"), metadata=metadata)


async def assert_refused(address: str, text: str, message: str) -> None:
    code, details = await list_with(address, text)
    assert (code, details) == (UNAUTHENTICATED, message)


async def assert_works(address: str, text: str) -> None:
    code, details = await list_with(address, text)
    assert code == OK, f"{code.name}: {details}"


async def poll_status(address: str, text: str, want: Status, within: float = 5.0) -> None:
    deadline = time.monotonic() + within
    while True:
        got = await list_with(address, text)
        if got == want:
            return
        assert time.monotonic() < deadline, f"still {got} after {within}s, want {want}"
        await asyncio.sleep(0.1)


def transport_of(text: str) -> vs.TokenTransport:
    raw = base58.b58decode(text)
    assert raw[:4] == tokens.MAGIC
    return vs.TokenTransport.FromString(raw[4:])


def armor(transport: vs.TokenTransport, magic: bytes = tokens.MAGIC) -> str:
    return base58.b58encode(magic + transport.SerializeToString()).decode("ascii")


def token_id(text: str) -> str:
    """What `waystation token inspect` shows as the id."""
    return tokens.token_id_hex(tokens.unverified(text)[0])


async def signing_key(server: RunningServer) -> tuple[str, bytes]:
    return await server.store.key_signing(now_us())


async def key_of(server: RunningServer, key_id: str) -> bytes:
    def read(conn: Any) -> bytes:
        import sqlalchemy as sa

        from waystation.store.schema import auth_keys

        key: bytes = conn.execute(
            sa.select(auth_keys.c.key).where(auth_keys.c.id == key_id)
        ).scalar_one()
        return key

    return await server.store._db.read(read)


async def bases_and_jobs(vagrant: vs_grpc.VagrantAsyncStub) -> tuple[list[str], list[str]]:
    bases = (await vagrant.ListBasis(Empty())).basis
    jobs = (await vagrant._ListJobs(vs.ListJobsRequest())).jobs
    return sorted(b.resource_id for b in bases), sorted(j.id for j in jobs)


@pytest.fixture
async def plain(server: RunningServer) -> AsyncIterator[aio.Channel]:
    """A channel with no token and no protocol header."""
    async with aio.insecure_channel(server.address) as ch:
        yield ch


@pytest.fixture
async def second(settings: ServerSettings, tmp_path: Path) -> AsyncIterator[RunningServer]:
    """Another in-process server on the same database (a replica)."""
    running = await start(dataclasses.replace(settings, data_dir=tmp_path / "data2"))
    yield running
    await running.stop(1)


# -- the guard in front of every method ------------------------------------------------


async def test_every_private_method_needs_a_token(
    server: RunningServer,
    token: str,
    plain: aio.Channel,
    vagrant: vs_grpc.VagrantAsyncStub,
) -> None:
    before = await bases_and_jobs(vagrant)
    keys_before = await server.store.keys_active()
    # Requests that would change state if they got through.
    mutating: dict[str, Message] = {
        "UpsertBasis": vs.UpsertBasisRequest(basis=t.basis()),
        "QueueJob": vs.QueueJobRequest(job=t.noop_job()),
        "UpsertBox": vs.UpsertBoxRequest(box=t.box()),
        "RevokeToken": admin_pb.RevokeTokenRequest(token_id=token_id(token)),
        "GenerateInviteToken": vs.InviteTokenRequest(duration="1h"),
    }
    # Every call is refused at once; the deadline only bounds a stuck server, so
    # it is generous (44 calls at once on a loaded machine took over 3 s once).
    results = await asyncio.gather(
        *(
            invoke(plain, m, mutating.get(m.name), timeout=60)
            for m in METHODS
            if m.name not in PUBLIC
        )
    )
    names = [m.name for m in METHODS if m.name not in PUBLIC]
    wrong = {
        n: r for n, r in zip(names, results, strict=True) if r != (UNAUTHENTICATED, NOT_SUPPLIED)
    }
    assert not wrong
    assert len(names) == len(METHODS) - 3 == 46

    # The public ones answer without a token.
    assert (await invoke(plain, method("GetVersionInfo")))[0] == OK
    assert await invoke(plain, method("BootstrapToken")) == (
        PERMISSION_DENIED,
        "server is already bootstrapped",
    )
    code, _ = await invoke(plain, method("ConvertInviteToken"))
    assert code == grpc.StatusCode.FAILED_PRECONDITION
    health = await health_pb2_grpc.HealthStub(plain).Check(health_pb2.HealthCheckRequest())
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    reflection = reflection_pb2_grpc.ServerReflectionStub(plain).ServerReflectionInfo(
        iter([reflection_pb2.ServerReflectionRequest(list_services="")])
    )
    names_listed = {s.name async for r in reflection for s in r.list_services_response.service}
    assert "hashicorp.vagrant.Vagrant" in names_listed

    # Nothing changed: no basis, job, box, revocation or key.
    assert await bases_and_jobs(vagrant) == before
    assert await server.store.keys_active() == keys_before
    assert not await server.store.token_is_revoked(token_id(token))
    assert (await vagrant.ListBoxes(Empty())).boxes == []


async def test_every_method_passes_the_guard_with_a_token(
    server: RunningServer, channel: aio.Channel
) -> None:
    results = await asyncio.gather(*(invoke(channel, m) for m in METHODS))
    refused = {
        m.name: r
        for m, r in zip(METHODS, results, strict=True)
        if r[0] in (UNAUTHENTICATED, PERMISSION_DENIED)
    }
    # BootstrapToken is refused by the RPC itself, not the guard.
    assert refused == {"BootstrapToken": (PERMISSION_DENIED, "server is already bootstrapped")}
    # Empty requests are the caller's mistake, never a server error.
    broken = {m.name: r for m, r in zip(METHODS, results, strict=True) if r[0] in BROKEN}
    assert not broken


# -- tokens the guard refuses ----------------------------------------------------------


async def test_empty_authorization_is_not_supplied(server: RunningServer, token: str) -> None:
    await assert_refused(server.address, "", NOT_SUPPLIED)


async def test_forged_signature(server: RunningServer, token: str) -> None:
    transport = transport_of(token)
    signature = bytearray(transport.signature)
    signature[0] ^= 0x01
    transport.signature = bytes(signature)
    await assert_refused(server.address, armor(transport), tokens.BAD_SIGNATURE)
    # The original still works: only the flipped byte made the difference.
    await assert_works(server.address, token)


async def test_changed_body(server: RunningServer, token: str) -> None:
    transport = transport_of(token)
    body = vs.Token.FromString(transport.body)
    body.user = "root"
    transport.body = body.SerializeToString()
    await assert_refused(server.address, armor(transport), tokens.BAD_SIGNATURE)


async def test_unknown_key_id(server: RunningServer, token: str) -> None:
    transport = transport_of(token)
    transport.key_id = "k9"
    await assert_refused(server.address, armor(transport), tokens.UNKNOWN_KEY)
    transport.key_id = "K1"  # exact, case-sensitive
    await assert_refused(server.address, armor(transport), tokens.UNKNOWN_KEY)


async def test_wrong_magic(server: RunningServer, token: str) -> None:
    await assert_refused(server.address, armor(transport_of(token), b"wp25"), tokens.BAD_MAGIC)


async def test_truncated(server: RunningServer, token: str) -> None:
    short = base58.b58encode(b"wp2").decode("ascii")
    await assert_refused(server.address, short, tokens.BAD_MAGIC)
    await assert_refused(server.address, token[:3], tokens.BAD_MAGIC)
    # Cut after the magic: the transport no longer parses.
    raw = base58.b58decode(token)
    cut = base58.b58encode(raw[:-5]).decode("ascii")
    await assert_refused(server.address, cut, tokens.MALFORMED)


async def test_not_base58(server: RunningServer, token: str) -> None:
    for bad in ("0" + token[1:], token[:10] + "l" + token[11:], token + " x", "Ovagrant"):
        await assert_refused(server.address, bad, tokens.NOT_BASE58)


async def test_too_long(server: RunningServer, token: str) -> None:
    await assert_refused(server.address, "z" * (tokens.MAX_TOKEN_TEXT + 1), tokens.MALFORMED)


async def test_bearer_prefix_is_accepted(server: RunningServer, token: str) -> None:
    await assert_works(server.address, "Bearer " + token)


async def test_invite_is_not_a_login_token_and_expires(
    server: RunningServer, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    invite = (await vagrant.GenerateInviteToken(vs.InviteTokenRequest(duration="1s"))).token
    claims, _ = tokens.unverified(invite)
    assert claims.invite and not claims.login and claims.HasField("valid_until")
    await assert_refused(
        server.address,
        invite,
        "invalid authentication token: an invite token is not a login token",
    )
    await asyncio.sleep(1.3)
    await assert_refused(server.address, invite, tokens.EXPIRED)
    await t.expect_status(
        vagrant.ConvertInviteToken(vs.ConvertInviteTokenRequest(token=invite)),
        UNAUTHENTICATED,
        tokens.EXPIRED,
    )


async def test_entrypoint_token_reaches_no_normal_method(server: RunningServer, token: str) -> None:
    key_id, key = await signing_key(server)
    body = tokens.login_token("admin", entrypoint=vs.Token.Entrypoint(deployment_id="d-1"))
    text = tokens.encode(body, key_id, key)
    code, details = await list_with(server.address, text)
    assert (code, details) == (
        PERMISSION_DENIED,
        "entrypoint tokens may only call Entrypoint methods",
    )
    async with aio.insecure_channel(server.address) as ch:
        md = [("authorization", text)]
        code, _ = await invoke(ch, method("GenerateLoginToken"), metadata=md)
        assert code == PERMISSION_DENIED
        admin_revoke = admin_pb.DESCRIPTOR.services_by_name["Admin"].methods_by_name["RevokeToken"]
        request = admin_pb.RevokeTokenRequest(token_id=token_id(token))
        code, _ = await invoke(ch, admin_revoke, request, metadata=md)
        assert code == PERMISSION_DENIED
    await assert_works(server.address, token)


async def test_token_signed_by_a_retired_key(server: RunningServer, token: str) -> None:
    old_id, old_key = await signing_key(server)
    assert old_id == "k1"
    assert await server.store.key_rotate(now_us()) == "k2"
    await server.store.key_retire("k1", now_us())
    # Signed with k1 after its retirement, e.g. by a stale replica or a stolen key.
    text = tokens.encode(tokens.login_token("admin"), old_id, old_key)
    await poll_status(server.address, text, (UNAUTHENTICATED, tokens.UNKNOWN_KEY))
    await poll_status(server.address, token, (UNAUTHENTICATED, tokens.UNKNOWN_KEY))


# -- revocation ------------------------------------------------------------------------


async def test_revoked_token_is_refused_everywhere_at_once(
    server: RunningServer,
    second: RunningServer,
    token: str,
    vagrant: vs_grpc.VagrantAsyncStub,
    admin: admin_grpc.AdminAsyncStub,
) -> None:
    victim = (await vagrant.GenerateLoginToken(Empty())).token
    # Both servers have checked it once, so anything they cache is warm.
    await assert_works(server.address, victim)
    await assert_works(second.address, victim)

    ident = token_id(victim)
    assert len(ident) == 32
    assert (await admin.RevokeToken(admin_pb.RevokeTokenRequest(token_id=ident))).revoked
    revoked = "invalid authentication token: token has been revoked"
    await assert_refused(server.address, victim, revoked)
    await assert_refused(second.address, victim, revoked)
    # The same signed body under another armor (metadata changed) is still revoked.
    transport = transport_of(victim)
    transport.metadata["x"] = "y"
    await assert_refused(second.address, armor(transport), revoked)

    # Again: already revoked. Upper-case hex names the same id.
    again = await admin.RevokeToken(admin_pb.RevokeTokenRequest(token_id=ident.upper()))
    assert not again.revoked
    for bad in ("", "xyz", ident[:-1], ident + "0", "g" * 32):
        await t.expect_status(
            admin.RevokeToken(admin_pb.RevokeTokenRequest(token_id=bad)), INVALID_ARGUMENT
        )
    # Other tokens are untouched, on both servers.
    await assert_works(server.address, token)
    await assert_works(second.address, token)


async def test_revoked_invite_cannot_be_converted(
    server: RunningServer, vagrant: vs_grpc.VagrantAsyncStub, admin: admin_grpc.AdminAsyncStub
) -> None:
    invite = (await vagrant.GenerateInviteToken(vs.InviteTokenRequest(duration="1h"))).token
    await admin.RevokeToken(admin_pb.RevokeTokenRequest(token_id=token_id(invite)))
    await t.expect_status(
        vagrant.ConvertInviteToken(vs.ConvertInviteTokenRequest(token=invite)),
        UNAUTHENTICATED,
        "token has been revoked",
    )


ROUNDS = 20


async def unbootstrap(server: RunningServer) -> None:
    """Back to a fresh database, as far as auth is concerned."""

    def reset(conn: Any) -> None:
        import sqlalchemy as sa

        from waystation.store.schema import auth_keys, server_flags

        conn.execute(sa.delete(server_flags))
        conn.execute(sa.delete(auth_keys))

    await server.store._db.write(reset)


async def test_concurrent_bootstrap_on_two_replicas(
    request: pytest.FixtureRequest,
    backend_url: str,
    server: RunningServer,
    second: RunningServer,
) -> None:
    async with (
        aio.insecure_channel(server.address) as a,
        aio.insecure_channel(second.address) as b,
    ):
        for _ in range(ROUNDS):
            await unbootstrap(server)
            results = await asyncio.gather(
                invoke(a, method("BootstrapToken")), invoke(b, method("BootstrapToken"))
            )
            assert sorted(code.name for code, _ in results) == ["OK", "PERMISSION_DENIED"], results


async def test_concurrent_revoke_on_two_replicas(
    request: pytest.FixtureRequest,
    backend_url: str,
    server: RunningServer,
    second: RunningServer,
    token: str,
) -> None:
    revoke = admin_pb.DESCRIPTOR.services_by_name["Admin"].methods_by_name["RevokeToken"]
    md = [("authorization", token)]
    async with (
        aio.insecure_channel(server.address) as a,
        aio.insecure_channel(second.address) as b,
    ):
        for _ in range(ROUNDS):
            req = admin_pb.RevokeTokenRequest(token_id=os.urandom(16).hex())
            results = await asyncio.gather(
                invoke(a, revoke, req, metadata=md), invoke(b, revoke, req, metadata=md)
            )
            assert [code for code, _ in results] == [OK, OK], results


# -- the token RPCs --------------------------------------------------------------------


async def test_bootstrap_only_once(server: RunningServer, token: str, plain: aio.Channel) -> None:
    stub = vs_grpc.VagrantStub(plain)
    await t.expect_status(
        stub.BootstrapToken(Empty()), PERMISSION_DENIED, "server is already bootstrapped"
    )
    # Not even with a valid token.
    md = (("authorization", token),)
    exc = await t.expect_status(stub.BootstrapToken(Empty(), metadata=md), PERMISSION_DENIED)
    assert exc.details() == "server is already bootstrapped"
    claims, key_id = tokens.unverified(token)
    assert (claims.login, claims.user, key_id) == (True, "admin", "k1")
    assert len(claims.token_id) == tokens.TOKEN_ID_SIZE


async def test_generate_login_token(
    server: RunningServer, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    first = (await vagrant.GenerateLoginToken(Empty())).token
    second = (await vagrant.GenerateLoginToken(Empty())).token
    assert token_id(first) != token_id(second)
    claims, _ = tokens.unverified(first)
    assert claims.login and not claims.invite
    # The server's default TTL (30 days; issue #21): login tokens expire.
    left = claims.valid_until.seconds - time.time()
    assert 29 * 86400 < left <= 30 * 86400
    await assert_works(server.address, first)
    await assert_works(server.address, second)


@pytest.mark.parametrize(
    ("duration", "code", "fragment"),
    [
        ("", grpc.StatusCode.FAILED_PRECONDITION, "duration is required"),
        ("abc", INVALID_ARGUMENT, "invalid duration"),
        ("1x", INVALID_ARGUMENT, "invalid duration"),
        ("24", INVALID_ARGUMENT, "invalid duration"),
        ("-1h", INVALID_ARGUMENT, "must be positive"),
        ("0s", INVALID_ARGUMENT, "must be positive"),
        ("0", INVALID_ARGUMENT, "must be positive"),
        ("9999999999999h", INVALID_ARGUMENT, "invalid duration"),
    ],
)
async def test_generate_invite_bad_duration(
    vagrant: vs_grpc.VagrantAsyncStub, duration: str, code: grpc.StatusCode, fragment: str
) -> None:
    await t.expect_status(
        vagrant.GenerateInviteToken(vs.InviteTokenRequest(duration=duration)), code, fragment
    )


async def test_convert_invite_gives_a_working_login_token(
    server: RunningServer, vagrant: vs_grpc.VagrantAsyncStub, plain: aio.Channel
) -> None:
    invite = (await vagrant.GenerateInviteToken(vs.InviteTokenRequest(duration="1h"))).token
    public = vs_grpc.VagrantStub(plain)  # converting needs no token
    login = (await public.ConvertInviteToken(vs.ConvertInviteTokenRequest(token=invite))).token
    claims, key_id = tokens.unverified(login)
    assert claims.login and not claims.invite and not claims.HasField("entrypoint")
    assert key_id == "k1" and token_id(login) != token_id(invite)
    await assert_works(server.address, login)
    # An invite converts more than once until it expires (as upstream).
    again = (await public.ConvertInviteToken(vs.ConvertInviteTokenRequest(token=invite))).token
    await assert_works(server.address, again)


async def test_convert_invite_keeps_entrypoint_and_metadata(
    server: RunningServer, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    entrypoint = vs.Token.Entrypoint(deployment_id="dep-7")
    request = vs.InviteTokenRequest(duration="1h", entrypoint=entrypoint)
    invite = (await vagrant.GenerateInviteToken(request)).token
    assert tokens.unverified(invite)[0].entrypoint == entrypoint
    # Metadata rides beside the signed body; conversion carries it over.
    transport = transport_of(invite)
    transport.metadata["team"] = "infra"
    response = await vagrant.ConvertInviteToken(
        vs.ConvertInviteTokenRequest(token=armor(transport))
    )
    claims, _ = tokens.unverified(response.token)
    assert claims.login and claims.entrypoint == entrypoint
    assert dict(transport_of(response.token).metadata) == {"team": "infra"}
    code, _ = await list_with(server.address, response.token)
    assert code == PERMISSION_DENIED


async def test_convert_invite_refusals(
    server: RunningServer, token: str, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    convert = vagrant.ConvertInviteToken
    await t.expect_status(
        convert(vs.ConvertInviteTokenRequest(token=token)),
        PERMISSION_DENIED,
        "token is not an invite token",
    )
    await t.expect_status(
        convert(vs.ConvertInviteTokenRequest(token="garbage")),
        UNAUTHENTICATED,
        tokens.ERROR_PREFIX,
    )
    await t.expect_status(
        convert(vs.ConvertInviteTokenRequest(token="3yZe7d")), UNAUTHENTICATED, tokens.BAD_MAGIC
    )
    await t.expect_status(
        convert(vs.ConvertInviteTokenRequest(token="")), grpc.StatusCode.FAILED_PRECONDITION
    )
    # Huge metadata on an invite is refused rather than copied into a login token.
    invite = (await vagrant.GenerateInviteToken(vs.InviteTokenRequest(duration="1h"))).token
    transport = transport_of(invite)
    transport.metadata["big"] = "x" * 2000
    await t.expect_status(
        convert(vs.ConvertInviteTokenRequest(token=armor(transport))), INVALID_ARGUMENT
    )


# -- signing keys ----------------------------------------------------------------------


async def test_key_rotation_and_retirement(
    server: RunningServer, token: str, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    assert tokens.unverified(token)[1] == "k1"
    assert await server.store.key_rotate(now_us()) == "k2"
    fresh = (await vagrant.GenerateLoginToken(Empty())).token
    assert tokens.unverified(fresh)[1] == "k2"
    invite = (await vagrant.GenerateInviteToken(vs.InviteTokenRequest(duration="1h"))).token
    assert tokens.unverified(invite)[1] == "k2"
    # Old tokens keep working; new ones work (at the latest once the key cache renews).
    await assert_works(server.address, token)
    await poll_status(server.address, fresh, (OK, ""))
    keys = await server.store.keys_list()
    assert [(k, retired) for k, _, retired in keys] == [("k1", None), ("k2", None)]

    await server.store.key_retire("k1", now_us())
    started = time.monotonic()
    await poll_status(server.address, token, (UNAUTHENTICATED, tokens.UNKNOWN_KEY))
    assert time.monotonic() - started < KEY_CACHE_SECONDS + 2
    await assert_works(server.address, fresh)
    # The only active key cannot be retired; an unknown one cannot either.
    with pytest.raises(Exception, match="only active key"):
        await server.store.key_retire("k2", now_us())
    with pytest.raises(Exception, match="no active key"):
        await server.store.key_retire("k1", now_us())


async def test_token_minted_with_a_new_key_works_at_once(
    server: RunningServer, token: str, vagrant: vs_grpc.VagrantAsyncStub
) -> None:
    await vagrant.ListBasis(Empty())  # the key cache is now fresh
    assert await server.store.key_rotate(now_us()) == "k2"
    fresh = (await vagrant.GenerateLoginToken(Empty())).token
    assert tokens.unverified(fresh)[1] == "k2"
    await assert_works(server.address, fresh)


async def test_bootstrap_token_works_at_once_after_an_earlier_bad_token(
    server: RunningServer, plain: aio.Channel
) -> None:
    # A stale client knocks before anyone logs in: the key cache is loaded empty.
    stale = tokens.encode(tokens.login_token(), "k1", tokens.new_key())
    await assert_refused(server.address, stale, tokens.UNKNOWN_KEY)
    bootstrap = (await vs_grpc.VagrantStub(plain).BootstrapToken(Empty())).token
    await assert_works(server.address, bootstrap)


# -- the protocol header ---------------------------------------------------------------


async def test_client_api_protocol_header(server: RunningServer, token: str) -> None:
    address = server.address
    for fine in ("1,1", "0,1", "1,2", " 1 , 1 "):
        code, details = await list_with(address, token, fine)
        assert code == OK, f"{fine!r}: {code.name} {details}"
    assert (await list_with(address, token))[0] == OK  # absent
    code, details = await list_with(address, token, "2,3")
    assert code == INVALID_ARGUMENT and "incompatible client protocol" in details
    code, details = await list_with(address, token, "0,0")
    assert code == INVALID_ARGUMENT and "incompatible client protocol" in details
    for bad in ("abc", "", "1", "1,1,1", "2,1", "-1,1", "1.0,1"):
        code, details = await list_with(address, token, bad)
        assert code == INVALID_ARGUMENT, f"{bad!r}: {code.name} {details}"
        assert "client-api-protocol" in details
    # GetVersionInfo is never checked, so old and new clients can ask what we speak.
    async with aio.insecure_channel(address) as ch:
        for header in ("2,3", "abc"):
            md = [("client-api-protocol", header)]
            assert (await invoke(ch, method("GetVersionInfo"), metadata=md))[0] == OK
        info = await vs_grpc.VagrantStub(ch).GetVersionInfo(Empty())
        assert (info.info.api.minimum, info.info.api.current) == (1, 1)
        # Other services do not take the Vagrant header.
        admin_list = admin_pb.DESCRIPTOR.services_by_name["Admin"].methods_by_name["ListRunners"]
        md = [("authorization", token), ("client-api-protocol", "2,3")]
        assert (await invoke(ch, admin_list, metadata=md))[0] == OK


# -- fuzz ------------------------------------------------------------------------------

PRINTABLE = st.characters(min_codepoint=0x20, max_codepoint=0x7E)
AUTHORIZATION = st.one_of(
    st.text(PRINTABLE, max_size=120),
    st.binary(max_size=200).map(lambda b: base58.b58encode(b).decode("ascii")),
    st.binary(max_size=200).map(lambda b: base58.b58encode(tokens.MAGIC + b).decode("ascii")),
    st.binary(max_size=60).map(
        lambda b: "Bearer " + base58.b58encode(tokens.MAGIC + b).decode("ascii")
    ),
    st.integers(4000, 6000).map(lambda n: "2" * n),
)


@settings(
    max_examples=50,
    database=None,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(value=AUTHORIZATION)
async def test_random_authorization_is_always_unauthenticated(
    server: RunningServer, token: str, plain: aio.Channel, value: str
) -> None:
    code, details = await invoke(
        plain, method("ListBasis"), metadata=[("authorization", value)], timeout=10
    )
    assert code not in BROKEN, f"{value!r}: {code.name} {details}"
    assert code == UNAUTHENTICATED, f"{value!r}: {code.name} {details}"


async def test_runner_parked_for_work_gets_nothing_after_its_token_is_revoked(
    server: RunningServer,
    vagrant: vs_grpc.VagrantAsyncStub,
    admin: admin_grpc.AdminAsyncStub,
) -> None:
    """A long call was authorized when it started; the token is checked again
    before a job is handed out, so a revoked runner waiting for work gets none."""
    minted = (await vagrant.GenerateLoginToken(Empty())).token
    async with Connection(server.address, minted).aio_channel() as runner_channel:
        runner = t.FakeRunner(runner_channel, "parked")
        await runner.register()
        stream = runner.job_stream()
        await stream.request()
        await asyncio.sleep(0.5)  # parked in the engine, waiting for work
        await admin.RevokeToken(admin_pb.RevokeTokenRequest(token_id=token_id(minted)))
        job_id = (await vagrant.QueueJob(vs.QueueJobRequest(job=t.noop_job()))).job_id
        with pytest.raises(aio.AioRpcError) as refused:
            await stream.read(timeout=60)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
        assert "revoked" in (refused.value.details() or "")
        await runner.close()
    # The job it was handed goes back to the queue (in the background, so poll).
    deadline = time.monotonic() + 30
    while (job := await vagrant.GetJob(vs.GetJobRequest(job_id=job_id))).state != vs.Job.QUEUED:
        assert job.state == vs.Job.WAITING and time.monotonic() < deadline, job
        await asyncio.sleep(0.05)
    assert not job.HasField("assigned_runner")
