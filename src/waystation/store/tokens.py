"""Minted tokens (issue #21): who holds each, its label, expiry and last use.

A token carries its own claims, signed; this row is for people (`token list`)
and for what the token does not carry: its label and an invite's role.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from waystation.core.roles import Role
from waystation.store.schema import revoked_tokens, tokens

TOUCH_EVERY_US = 60_000_000  # last use is recorded at most this often


@dataclass(frozen=True)
class TokenRow:
    token_id: str  # hex
    user: str
    kind: str  # login or invite
    label: str
    created_at: int
    expires_at: int | None = None
    role: Role | None = None  # an invite's
    last_used_at: int | None = None
    revoked: bool = False

    @classmethod
    def from_row(cls, row: Any) -> TokenRow:
        role = Role(row.role) if row.role else None
        return cls(
            row.token_id,
            row.user,
            row.kind,
            row.label,
            row.created_at,
            row.expires_at,
            role,
            row.last_used_at,
            bool(getattr(row, "revoked", False)),
        )


def token_add(conn: Connection, row: TokenRow) -> None:
    conn.execute(
        sa.insert(tokens).values(
            token_id=row.token_id,
            user=row.user,
            user_key=row.user.lower(),
            kind=row.kind,
            label=row.label,
            role=row.role.value if row.role else None,
            created_at=row.created_at,
            expires_at=row.expires_at,
        )
    )


def token_find(conn: Connection, token_id: str) -> TokenRow | None:
    row = conn.execute(sa.select(tokens).where(tokens.c.token_id == token_id)).first()
    return None if row is None else TokenRow.from_row(row)


def token_list(conn: Connection, user: str) -> list[TokenRow]:
    """Every recorded token, or one user's (ignoring case), oldest first."""
    revoked = revoked_tokens.c.token_id.is_not(None).label("revoked")
    query = (
        sa.select(tokens, revoked)
        .select_from(
            tokens.outerjoin(revoked_tokens, revoked_tokens.c.token_id == tokens.c.token_id)
        )
        .order_by(tokens.c.created_at, tokens.c.token_id)
    )
    if user:
        query = query.where(tokens.c.user_key == user.lower())
    return [TokenRow.from_row(r) for r in conn.execute(query)]


def token_touch(conn: Connection, token_id: str, now: int) -> None:
    """Record a use, unless one was recorded within the last minute (by any replica)."""
    conn.execute(
        sa.update(tokens)
        .where(
            tokens.c.token_id == token_id,
            sa.or_(
                tokens.c.last_used_at.is_(None),
                tokens.c.last_used_at < now - TOUCH_EVERY_US,
            ),
        )
        .values(last_used_at=now)
    )
