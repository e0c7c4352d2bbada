"""Roles (issue #21): the policy table, walked whole, and the guard that applies it.

Every RPC of every service has an entry; every (RPC, role) pair is called for
real: a refused one is PERMISSION_DENIED naming the role and changes nothing,
an allowed one gets past the guard. A disabled or deleted user, or a new role,
acts at once on another replica sharing the database.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from google.protobuf import message_factory
from google.protobuf.descriptor import MethodDescriptor
from google.protobuf.empty_pb2 import Empty
from grpc import aio
from test_auth import (
    OK,
    PERMISSION_DENIED,
    UNAUTHENTICATED,
    Status,
    invoke,
    list_with,
    path_of,
)

from waystation.auth import policy, tokens
from waystation.core.roles import Role
from waystation.core.settings import ServerSettings
from waystation.core.timeouts import now_us
from waystation.core.wire import TOKEN_USER
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.waystation.v1 import admin_pb2 as admin_pb
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.protocol.waystation.v1 import users_pb2 as pu
from waystation.protocol.waystation.v1 import users_pb2_grpc as pu_grpc
from waystation.server.app import RunningServer, start
from waystation.store import Store
from waystation.store.migrate import alembic_config
from waystation.store.schema import auth_keys, metadata, server_flags

SERVICES = (
    *vs.DESCRIPTOR.services_by_name.values(),
    *pd.DESCRIPTOR.services_by_name.values(),
    *admin_pb.DESCRIPTOR.services_by_name.values(),
    *pv.DESCRIPTOR.services_by_name.values(),
    *pu.DESCRIPTOR.services_by_name.values(),
)
METHODS = [m for service in SERVICES for m in service.methods]
PRIVATE = [m for m in METHODS if path_of(m) not in policy.PUBLIC]
NAMES = {Role.MEMBER: "alice", Role.RUNNER: "ci-runner-1", Role.PROVISIONER: "daemon-1"}


def test_every_method_of_every_service_has_exactly_one_entry() -> None:
    paths = {path_of(m) for m in METHODS}
    assert len(paths) == len(METHODS)
    missing = paths - policy.PUBLIC - policy.METHODS.keys()
    assert not missing, f"RPCs with no policy entry: {sorted(missing)}"
    assert not (policy.METHODS.keys() - paths), "entries for RPCs that do not exist"
    assert not (policy.PUBLIC & policy.METHODS.keys())
    assert set(policy.METHODS.values()) == set(policy.ACTIONS), "actions unused or undefined"
    assert all(Role.ADMIN in roles for roles in policy.ACTIONS.values())
    assert policy.ACTIONS.keys() >= policy.OWNER_SCOPED


def test_the_roles_the_issue_names() -> None:
    def allowed(role: Role) -> set[str]:
        return {p.rsplit("/", 1)[1] for p, a in policy.METHODS.items() if role in policy.ACTIONS[a]}

    assert allowed(Role.PROVISIONER) == {
        m.name for m in pd.DESCRIPTOR.services_by_name["ProvisionerDaemon"].methods
    } | {"GenerateLoginToken", "WhoAmI", "ListTokens", "RevokeToken"}  # their own
    runner = allowed(Role.RUNNER)
    assert {"RunnerConfig", "RunnerJobStream", "GetRunner", "UpsertTarget", "ListBoxes"} <= runner
    assert not runner & {"QueueJob", "CancelJob", "PushTemplate", "CreateWorkspace", "AcquireJob"}
    member = allowed(Role.MEMBER)
    assert {"QueueJob", "ValidateJob", "CancelJob", "PushTemplate", "CreateWorkspace"} <= member
    admin_only = {"SetQuota", "CreateSnapshot", "RestoreSnapshot", "PruneOldJobs", "ConfigSet"}
    admin_only |= {"GenerateInviteToken", "CreateUser", "ListAuditEvents"}
    assert not member & admin_only
    assert not member & {"RunnerJobStream", "AcquireJob"}


def test_a_refusal_names_the_role_needed() -> None:
    alice = policy.Principal("alice", Role.MEMBER, "00")
    assert policy.refusal("snapshots.restore", alice) == (
        "this call needs the admin role; your token's user alice is a member"
    )
    runner = policy.Principal("ci", Role.RUNNER, "00")
    assert policy.refusal("jobs.queue", runner) == (
        "this call needs the member (or admin) role; your token's user ci is a runner"
    )
    assert policy.refusal("runners.work", runner) == ""


# -- end to end --------------------------------------------------------------------------


async def mint(server: RunningServer, admin_token: str, user: str) -> str:
    """A login token for `user`, minted by the admin."""
    async with aio.insecure_channel(server.address) as ch:
        md = (("authorization", admin_token), (TOKEN_USER, user))
        response = await vs_grpc.VagrantStub(ch).GenerateLoginToken(Empty(), metadata=md)
    return str(response.token)


@pytest.fixture
async def tokens_by_role(server: RunningServer, token: str) -> dict[Role, str]:
    out = {Role.ADMIN: token}
    for role, name in NAMES.items():
        await server.store.user_create(name, role, now_us())
        out[role] = await mint(server, token, name)
    return out


async def fingerprint(server: RunningServer) -> dict[str, list[Any]]:
    """Every row of every table: what a refused call must leave as it was (but a
    token's last use, which any authenticated call records)."""

    def read(conn: Any) -> dict[str, list[Any]]:
        return {
            table.name: sorted(
                map(
                    tuple,
                    conn.execute(sa.select(*(c for c in table.c if c.name != "last_used_at"))),
                ),
                key=repr,
            )
            for table in metadata.sorted_tables
        }

    result: dict[str, list[Any]] = await server.store._db.read(read)
    return result


async def refused_call(channel: aio.Channel, method: MethodDescriptor, token: str) -> Status:
    """`invoke`, but a client-streaming call sends nothing: writing to a stream the
    server has already refused races in the gRPC client (INTERNAL on its side)."""
    if not method.client_streaming:
        return await invoke(channel, method, metadata=(("authorization", token),), timeout=60)
    response = message_factory.GetMessageClass(method.output_type)
    kw: dict[str, Any] = {
        "request_serializer": message_factory.GetMessageClass(method.input_type).SerializeToString,
        "response_deserializer": response.FromString,
    }
    md = aio.Metadata(("authorization", token))
    try:
        if method.server_streaming:
            call = channel.stream_stream(path_of(method), **kw)
            async for _ in call(iter(()), metadata=md, timeout=60):
                pass
        else:
            unary = channel.stream_unary(path_of(method), **kw)
            await unary(iter(()), metadata=md, timeout=60)
    except aio.AioRpcError as exc:
        return exc.code(), exc.details() or ""
    return OK, ""


async def test_every_rpc_for_every_role(
    server: RunningServer, tokens_by_role: dict[Role, str]
) -> None:
    before = await fingerprint(server)
    refused_pairs = [
        (m, role)
        for m in PRIVATE
        for role in NAMES
        if role not in policy.ACTIONS[policy.METHODS[path_of(m)]]
    ]
    async with aio.insecure_channel(server.address) as ch:
        results = await asyncio.gather(
            *(refused_call(ch, m, tokens_by_role[role]) for m, role in refused_pairs)
        )
    wrong = {}
    for (m, role), (code, details) in zip(refused_pairs, results, strict=True):
        want = f"your token's user {NAMES[role]} is a"
        if code != PERMISSION_DENIED or "this call needs the" not in details or want not in details:
            wrong[(m.name, role.value)] = (code, details)
    assert not wrong
    assert len(refused_pairs) > 60
    assert await fingerprint(server) == before  # a refusal changes nothing

    # Allowed pairs get past the guard; what the handler makes of an empty
    # request (or a runner stream waiting for its first message) is its own.
    allowed_pairs = [
        (m, role)
        for m in PRIVATE
        for role in Role
        if role in policy.ACTIONS[policy.METHODS[path_of(m)]]
    ]
    async with aio.insecure_channel(server.address) as ch:
        results = await asyncio.gather(
            *(
                invoke(ch, m, metadata=(("authorization", tokens_by_role[role]),), timeout=5)
                for m, role in allowed_pairs
            )
        )
    by_guard = {
        (m.name, role.value): r
        for (m, role), r in zip(allowed_pairs, results, strict=True)
        if r[0] in (PERMISSION_DENIED, UNAUTHENTICATED) and "this call" in r[1]
    }
    assert not by_guard


async def test_only_admins_mint_tokens_for_others(
    server: RunningServer, tokens_by_role: dict[Role, str]
) -> None:
    alice = tokens_by_role[Role.MEMBER]
    async with aio.insecure_channel(server.address) as ch:
        stub = vs_grpc.VagrantStub(ch)
        own = await stub.GenerateLoginToken(Empty(), metadata=(("authorization", alice),))
        assert (await list_with(server.address, own.token))[0] == OK
        md = (("authorization", alice), (TOKEN_USER, "admin"))
        with pytest.raises(aio.AioRpcError) as caught:
            await stub.GenerateLoginToken(Empty(), metadata=md)
    assert caught.value.code() == PERMISSION_DENIED
    assert "only an admin may mint a token for another user" in (caught.value.details() or "")


@pytest.fixture
async def second(settings: ServerSettings, tmp_path: Path) -> AsyncIterator[RunningServer]:
    """Another in-process server on the same database (a replica)."""
    running = await start(dataclasses.replace(settings, data_dir=tmp_path / "data2"))
    yield running
    await running.stop(1)


async def test_disabled_deleted_and_demoted_users_act_at_once_on_a_replica(
    server: RunningServer, second: RunningServer, token: str
) -> None:
    await server.store.user_create("bob", Role.ADMIN, now_us())
    await server.store.user_create("carol", Role.MEMBER, now_us())
    bob = await mint(server, token, "bob")
    carol = await mint(server, token, "carol")
    for address in (server.address, second.address):  # warm whatever is cached
        assert (await list_with(address, bob))[0] == OK
        assert (await list_with(address, carol))[0] == OK
    snapshot = "/waystation.v1.Admin/CreateSnapshot"

    # An expired token (signed with the shared key) is refused by the replica too.
    key_id, key = await server.store.key_signing(now_us())
    expired = tokens.login_token("carol")
    expired.valid_until.FromSeconds(int(time.time()) - 1)
    assert await list_with(second.address, tokens.encode(expired, key_id, key)) == (
        UNAUTHENTICATED,
        tokens.EXPIRED,
    )

    await server.store.user_disable("carol", now_us())
    assert await list_with(second.address, carol) == (
        UNAUTHENTICATED,
        "invalid authentication token: its user carol is disabled",
    )
    await server.store.user_set_role("bob", Role.MEMBER)
    method = next(m for m in METHODS if path_of(m) == snapshot)
    async with aio.insecure_channel(second.address) as ch:
        code, details = await invoke(ch, method, metadata=(("authorization", bob),))
    assert (code, details) == (
        PERMISSION_DENIED,
        "this call needs the admin role; your token's user bob is a member",
    )
    await server.store.user_delete("bob")
    assert await list_with(second.address, bob) == (
        UNAUTHENTICATED,
        "invalid authentication token: token has been revoked",  # with the user's deletion
    )
    assert (await list_with(second.address, token))[0] == OK


async def test_a_server_upgraded_in_place_keeps_its_tokens_as_admin_vagrant(
    settings: ServerSettings,
) -> None:
    """A database made before users: its tokens (upstream's user `vagrant`) keep
    working, as an admin."""
    key = tokens.new_key()
    store = await asyncio.to_thread(Store.open, settings.database_url)

    def made_before(conn: Any) -> None:
        command.downgrade(alembic_config(conn), "0005")
        conn.execute(sa.insert(server_flags).values(name="bootstrapped", set_at=1))
        conn.execute(sa.insert(auth_keys).values(id="k1", key=key, created_at=1))

    await asyncio.to_thread(store._db.run_sync, made_before)
    await store.close()
    old_token = tokens.encode(tokens.login_token(), "k1", key)  # as the old server minted
    running = await start(settings)
    try:
        assert (await list_with(running.address, old_token))[0] == OK
        async with aio.insecure_channel(running.address) as ch:
            md = (("authorization", old_token),)
            me = await pu_grpc.UsersStub(ch).WhoAmI(Empty(), metadata=md)
        assert (me.user.name, me.user.role) == ("vagrant", "admin")
    finally:
        await running.stop(1)
