"""Signing keys, the bootstrap flag and revoked tokens.

Tokens themselves are not stored: they carry their own claims, signed. The
database keeps what every replica must agree on at once: which keys verify,
whether the server was bootstrapped, and which token ids are revoked.
"""

from __future__ import annotations

import secrets

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Connection

from waystation.core.roles import BOOTSTRAP_USER, Role
from waystation.errors import FailedPrecondition, NotFound
from waystation.store.schema import auth_keys, revoked_tokens, server_flags, users

KEY_BYTES = 32


def _insert_if_absent(conn: Connection, table: sa.Table, **values: object) -> bool:
    """INSERT ... ON CONFLICT DO NOTHING: True if this call inserted the row.

    Check-then-insert would race between replicas under READ COMMITTED."""
    statement: sa.Insert
    if conn.dialect.name == "postgresql":
        statement = pg_insert(table).values(**values).on_conflict_do_nothing()
    else:
        statement = sqlite_insert(table).values(**values).on_conflict_do_nothing()
    # RETURNING, not rowcount: the drivers disagree on rowcount here.
    key = next(iter(table.primary_key.columns))
    return conn.execute(statement.returning(key)).first() is not None


def signing_key(conn: Connection, now: int) -> tuple[str, bytes]:
    """The newest active key; the first one (k1) is made on first use."""
    row = conn.execute(
        sa.select(auth_keys.c.id, auth_keys.c.key)
        .where(auth_keys.c.retired_at.is_(None))
        .order_by(auth_keys.c.created_at.desc(), auth_keys.c.id.desc())
        .limit(1)
    ).first()
    if row is not None:
        return row.id, row.key
    key_id = keys_rotate(conn, now)
    return key_id, _key(conn, key_id)


def _key(conn: Connection, key_id: str) -> bytes:
    key: bytes = conn.execute(
        sa.select(auth_keys.c.key).where(auth_keys.c.id == key_id)
    ).scalar_one()
    return key


def active_keys(conn: Connection) -> dict[str, bytes]:
    rows = conn.execute(
        sa.select(auth_keys.c.id, auth_keys.c.key).where(auth_keys.c.retired_at.is_(None))
    )
    return {r.id: r.key for r in rows}


def keys_rotate(conn: Connection, now: int) -> str:
    """Add a key that signs from now on; older active keys still verify."""
    while True:  # another replica may take the same number: then try the next
        numbers = [
            int(k[1:]) for k in conn.execute(sa.select(auth_keys.c.id)).scalars() if k[1:].isdigit()
        ]
        key_id = f"k{max(numbers, default=0) + 1}"
        key = secrets.token_bytes(KEY_BYTES)
        if _insert_if_absent(conn, auth_keys, id=key_id, key=key, created_at=now):
            return key_id


def keys_retire(conn: Connection, key_id: str, now: int) -> None:
    """Tokens signed with a retired key stop working everywhere."""
    active = active_keys(conn)
    if key_id not in active:
        raise NotFound(f"no active key {key_id!r}")
    if len(active) == 1:
        raise FailedPrecondition("cannot retire the only active key: rotate first")
    conn.execute(sa.update(auth_keys).where(auth_keys.c.id == key_id).values(retired_at=now))


def keys_list(conn: Connection) -> list[tuple[str, int, int | None]]:
    rows = conn.execute(
        sa.select(auth_keys.c.id, auth_keys.c.created_at, auth_keys.c.retired_at).order_by(
            auth_keys.c.created_at, auth_keys.c.id
        )
    )
    return [(r.id, r.created_at, r.retired_at) for r in rows]


def bootstrap(conn: Connection, now: int, user: str = BOOTSTRAP_USER) -> tuple[str, bytes] | None:
    """The signing key the first time ever (on any replica), None afterwards;
    `user` becomes the first admin.

    Flag, key and user in one transaction: a crash cannot leave the server marked
    bootstrapped with no way to sign the bootstrap token, or no admin to name."""
    if not _insert_if_absent(conn, server_flags, name="bootstrapped", set_at=now):
        return None
    # An admin of that name may be there already (made by the upgrade to 0006).
    _insert_if_absent(
        conn, users, name_key=user.lower(), name=user, role=Role.ADMIN.value, created_at=now
    )
    return signing_key(conn, now)


def revoke(conn: Connection, token_id: str, now: int) -> bool:
    """Revoke a token id (hex); False if it already was."""
    return _insert_if_absent(conn, revoked_tokens, token_id=token_id, revoked_at=now)


def is_revoked(conn: Connection, token_id: str) -> bool:
    return (
        conn.execute(
            sa.select(revoked_tokens.c.token_id).where(revoked_tokens.c.token_id == token_id)
        ).first()
        is not None
    )
