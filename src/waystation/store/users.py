"""Users: a name, a role and whether disabled (issue #21).

Tokens name their user (`Token.user`); the guard reads the user's row with the
token's revocation on every call, so disabling or deleting a user, or changing
their role, acts at once on every replica.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from waystation.core.roles import Role, user_name_problem
from waystation.errors import AlreadyExists, FailedPrecondition, InvalidArgument, NotFound
from waystation.store.auth import _insert_if_absent
from waystation.store.schema import revoked_tokens, tokens, users


@dataclass(frozen=True)
class User:
    name: str
    role: Role
    created_at: int  # microseconds since the epoch
    disabled_at: int | None = None

    @property
    def disabled(self) -> bool:
        return self.disabled_at is not None

    @classmethod
    def from_row(cls, row: Any) -> User:
        return cls(row.name, Role(row.role), row.created_at, row.disabled_at)


_COLUMNS = (users.c.name, users.c.role, users.c.created_at, users.c.disabled_at)


def _key(name: str) -> str:
    return name.lower()


def user_create(conn: Connection, name: str, role: Role, now: int) -> User:
    """A new user; AlreadyExists when the name (ignoring case) is taken."""
    problem = user_name_problem(name)
    if problem:
        raise InvalidArgument(f"invalid user name {name!r}: {problem}")
    if not _insert_if_absent(
        conn, users, name_key=_key(name), name=name, role=Role(role).value, created_at=now
    ):
        raise AlreadyExists(f"user {name!r} already exists")
    return User(name, Role(role), now)


def user_ensure(conn: Connection, name: str, role: Role, now: int) -> User:
    """The user named `name`, created with `role` if absent (an invite's conversion)."""
    found = user_find(conn, name)
    if found is not None:
        return found
    _insert_if_absent(
        conn, users, name_key=_key(name), name=name, role=Role(role).value, created_at=now
    )
    return user_get(conn, name)


def user_find(conn: Connection, name: str) -> User | None:
    row = conn.execute(sa.select(*_COLUMNS).where(users.c.name_key == _key(name))).first()
    return None if row is None else User.from_row(row)


def user_get(conn: Connection, name: str) -> User:
    found = user_find(conn, name)
    if found is None:
        raise NotFound(f"no user {name!r}")
    return found


def user_list(conn: Connection) -> list[User]:
    rows = conn.execute(sa.select(*_COLUMNS).order_by(users.c.name_key))
    return [User.from_row(r) for r in rows]


def _admins_left(conn: Connection, besides: str) -> int:
    count: int = conn.execute(
        sa.select(sa.func.count())
        .select_from(users)
        .where(
            users.c.role == Role.ADMIN.value,
            users.c.disabled_at.is_(None),
            users.c.name_key != _key(besides),
        )
    ).scalar_one()
    return count


def _keep_an_admin(conn: Connection, name: str, what: str) -> None:
    # Without an enabled admin nobody could mint tokens or manage users again.
    user = user_get(conn, name)
    if user.role is Role.ADMIN and not user.disabled and _admins_left(conn, name) == 0:
        raise FailedPrecondition(f"cannot {what} the last enabled admin {user.name!r}")


def user_set_role(conn: Connection, name: str, role: Role) -> User:
    if Role(role) is not Role.ADMIN:
        _keep_an_admin(conn, name, "demote")
    user = user_get(conn, name)
    conn.execute(
        sa.update(users).where(users.c.name_key == _key(name)).values(role=Role(role).value)
    )
    return User(user.name, Role(role), user.created_at, user.disabled_at)


def user_disable(conn: Connection, name: str, now: int) -> User:
    """Disable a user: every token of theirs is refused from now on. Idempotent."""
    _keep_an_admin(conn, name, "disable")
    user = user_get(conn, name)
    if user.disabled:
        return user
    conn.execute(sa.update(users).where(users.c.name_key == _key(name)).values(disabled_at=now))
    return User(user.name, user.role, user.created_at, now)


def user_delete(conn: Connection, name: str, now: int = 0) -> None:
    """Delete a user and revoke every token recorded for them, so that a user
    created later under the same name does not inherit them."""
    _keep_an_admin(conn, name, "delete")
    conn.execute(sa.delete(users).where(users.c.name_key == _key(name)))
    theirs = sa.select(tokens.c.token_id, sa.literal(now, sa.BigInteger)).where(
        tokens.c.user_key == _key(name),
        tokens.c.token_id.not_in(sa.select(revoked_tokens.c.token_id)),
    )
    conn.execute(sa.insert(revoked_tokens).from_select(["token_id", "revoked_at"], theirs))


def token_standing(conn: Connection, token_id: str, name: str) -> tuple[bool, User | None]:
    """Whether the token id is revoked, and its user (None if there is none).

    One read per authenticated call: both are looked up, never cached, so a
    revocation or a disabled user is refused at once on every replica."""
    revoked = (
        conn.execute(
            sa.select(revoked_tokens.c.token_id).where(revoked_tokens.c.token_id == token_id)
        ).first()
        is not None
    )
    return revoked, (None if revoked else user_find(conn, name))
