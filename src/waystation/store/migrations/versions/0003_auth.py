"""auth keys, server flags, revoked tokens

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-22 21:37:35.291947
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "auth_keys",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("key", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("retired_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_auth_keys")),
    )
    op.create_table(
        "revoked_tokens",
        sa.Column("token_id", sa.Text(), nullable=False),
        sa.Column("revoked_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("token_id", name=op.f("pk_revoked_tokens")),
    )
    op.create_table(
        "server_flags",
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("set_at", sa.BigInteger(), nullable=False),
        sa.PrimaryKeyConstraint("name", name=op.f("pk_server_flags")),
    )


def downgrade() -> None:

    op.drop_table("server_flags")
    op.drop_table("revoked_tokens")
    op.drop_table("auth_keys")
