"""users: a name, a role and whether disabled (issue #21)

An existing server's tokens all name upstream's one user, `vagrant`: a server
bootstrapped before this gets that user as an admin, so they keep working.

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-04 18:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    users = op.create_table(
        "users",
        sa.Column("name_key", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("role", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("disabled_at", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("name_key", name=op.f("pk_users")),
    )
    flags = sa.table("server_flags", sa.column("name", sa.Text), sa.column("set_at", sa.BigInteger))
    conn = op.get_bind()
    bootstrapped = conn.execute(
        sa.select(flags.c.set_at).where(flags.c.name == "bootstrapped")
    ).scalar()
    if bootstrapped is not None:
        op.bulk_insert(
            users,
            [
                {
                    "name_key": "vagrant",
                    "name": "vagrant",
                    "role": "admin",
                    "created_at": bootstrapped,
                    "disabled_at": None,
                }
            ],
        )


def downgrade() -> None:
    op.drop_table("users")
