"""Conformance of the token and key verbs (store/verbs/auth.py)."""

from __future__ import annotations

import asyncio

import pytest

from waystation.errors import FailedPrecondition
from waystation.store import Store

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
