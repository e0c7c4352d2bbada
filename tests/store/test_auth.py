"""Conformance of the token and key verbs (store/verbs/auth.py)."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Connection

from waystation.core.roles import LEGACY_USER, Actor, Role
from waystation.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from waystation.store import Store
from waystation.store import auth as auth_tx
from waystation.store import users as users_tx
from waystation.store.migrate import alembic_config
from waystation.store.schema import server_flags
from waystation.store.tokens import TokenRow

from .conftest import Reopen, now_us

TOKEN_ID = "0123456789abcdef0123456789abcdef"


async def test_a_revocation_survives_a_restart(store: Store, reopen: Reopen) -> None:
    assert not await store.token_is_revoked(TOKEN_ID)
    assert await store.token_revoke(TOKEN_ID, now_us())
    assert not await store.token_revoke(TOKEN_ID, now_us())  # already
    store = await reopen()
    assert await store.token_is_revoked(TOKEN_ID)


async def test_bootstrap_once_and_keys_rotate_and_retire(store: Store, reopen: Reopen) -> None:
    first = await store.token_bootstrap(now_us())
    assert first is not None
    assert await store.token_bootstrap(now_us()) is None
    key_id, key = await store.key_signing(now_us())
    assert (key_id, key) == first
    rotated = await store.key_rotate(now_us())
    store = await reopen()
    assert set(await store.keys_active()) == {key_id, rotated}
    await store.key_retire(key_id, now_us())
    with pytest.raises(FailedPrecondition):
        await store.key_retire(rotated, now_us())  # the last active key stays
    store = await reopen()
    assert list(await store.keys_active()) == [rotated]
    assert [(k, retired is not None) for k, _, retired in await store.keys_list()] == [
        (key_id, True),
        (rotated, False),
    ]


async def test_blocking_key_verbs_for_a_stopped_server(store: Store) -> None:
    """`waystation server keys` runs these with no event loop of its own."""
    await store.key_signing(now_us())
    rotated = await asyncio.to_thread(store.key_rotate_now, now_us())
    listed = await asyncio.to_thread(store.keys_list_now)
    assert rotated in [k for k, _, _ in listed]
    first = listed[0][0]
    await asyncio.to_thread(store.key_retire_now, first, now_us())
    assert list(await store.keys_active()) == [rotated]


# -- users (issue #21) ---------------------------------------------------------


async def test_bootstrap_makes_the_first_admin(store: Store, reopen: Reopen) -> None:
    assert await store.token_bootstrap(now_us(), "Root") is not None
    store = await reopen()
    user = await store.user_get("root")  # names ignore case
    assert (user.name, user.role, user.disabled) == ("Root", Role.ADMIN, False)


async def test_users_are_created_changed_disabled_and_deleted(store: Store, reopen: Reopen) -> None:
    await store.user_create("boss", Role.ADMIN, now_us())
    alice = await store.user_create("Alice", Role.MEMBER, now_us())
    assert alice.role is Role.MEMBER
    with pytest.raises(AlreadyExists):
        await store.user_create("ALICE", Role.RUNNER, now_us())
    with pytest.raises(InvalidArgument):
        await store.user_create("no spaces", Role.MEMBER, now_us())
    assert (await store.user_ensure("alice", Role.RUNNER, now_us())).role is Role.MEMBER
    assert (await store.user_ensure("ci-1", Role.RUNNER, now_us())).role is Role.RUNNER
    await store.user_set_role("alice", Role.PROVISIONER)
    await store.user_disable("alice", now_us())
    store = await reopen()
    assert [(u.name, u.role, u.disabled) for u in await store.user_list()] == [
        ("Alice", Role.PROVISIONER, True),
        ("boss", Role.ADMIN, False),
        ("ci-1", Role.RUNNER, False),
    ]
    assert await store.token_standing(TOKEN_ID, "ALICE") == (False, await store.user_get("alice"))
    await store.user_delete("alice")
    with pytest.raises(NotFound):
        await store.user_get("alice")
    assert await store.token_standing(TOKEN_ID, "alice") == (False, None)
    await store.token_revoke(TOKEN_ID, now_us())
    assert await store.token_standing(TOKEN_ID, "boss") == (True, None)


async def test_the_last_enabled_admin_stays(store: Store) -> None:
    await store.user_create("boss", Role.ADMIN, now_us())
    for refused in (
        store.user_set_role("boss", Role.MEMBER),
        store.user_disable("boss", now_us()),
        store.user_delete("boss"),
    ):
        with pytest.raises(FailedPrecondition):
            await refused
    await store.user_create("other", Role.ADMIN, now_us())
    await store.user_disable("boss", now_us())
    assert (await store.user_get("boss")).disabled


def test_an_upgraded_server_keeps_its_tokens_user_as_an_admin(backend_url: str) -> None:
    """Migration 0006 upgrades a database in place: a server bootstrapped before
    it gets upstream's one user, `vagrant`, as an admin; a fresh one gets none."""
    store = Store.open(backend_url)
    try:

        def check(conn: Connection) -> None:
            command.downgrade(alembic_config(conn), "0005")
            command.upgrade(alembic_config(conn), "0006")
            assert users_tx.user_list(conn) == []  # not bootstrapped: bootstrap makes one
            command.downgrade(alembic_config(conn), "0005")
            conn.execute(sa.insert(server_flags).values(name="bootstrapped", set_at=7))
            command.upgrade(alembic_config(conn), "head")
            assert users_tx.user_list(conn) == [users_tx.User(LEGACY_USER, Role.ADMIN, 7)]
            assert auth_tx.bootstrap(conn, 8) is None

        store._db.run_sync(check)
    finally:
        asyncio.run(store.close())


async def test_minted_tokens_are_listed_with_their_last_use(store: Store, reopen: Reopen) -> None:
    root = Actor("root", "ab" * 16)
    login = TokenRow("01" * 16, "Alice", "login", "laptop", 10, 99)
    invite = TokenRow("02" * 16, "ci-1", "invite", "", 11, 50, Role.RUNNER)
    await store.token_add(login, root, "token.login", 10)
    await store.token_add(invite, None, "token.invite", 11)  # no actor: not audited
    await store.token_revoke(invite.token_id, 12)
    await store.token_touch(login.token_id, 100_000_000)
    await store.token_touch(login.token_id, 100_000_001)  # within the minute: kept
    store = await reopen()
    assert await store.token_find(invite.token_id) == invite
    assert await store.token_find("ff" * 16) is None
    assert await store.token_list("alice") == [dataclasses.replace(login, last_used_at=100_000_000)]
    assert [(t.token_id, t.revoked) for t in await store.token_list("")] == [
        (login.token_id, False),
        (invite.token_id, True),
    ]
    assert [e.action for e in await store.audit_list("", "", 0, 10)] == ["token.login"]


async def test_deleting_a_user_revokes_their_recorded_tokens(store: Store) -> None:
    """So that a user made later under the same name does not inherit them."""
    await store.user_create("root", Role.ADMIN, now_us())
    await store.user_create("alice", Role.MEMBER, now_us())
    await store.token_add(TokenRow("03" * 16, "alice", "login", "", 1), None, "token.login", 1)
    await store.token_add(TokenRow("04" * 16, "alice", "login", "", 2), None, "token.login", 2)
    await store.token_revoke("04" * 16, 3)  # already: stays as it was
    await store.user_delete("ALICE", None, 5)
    await store.user_create("alice", Role.ADMIN, now_us())
    assert await store.token_standing("03" * 16, "alice") == (True, None)
    assert await store.token_standing("04" * 16, "alice") == (True, None)
