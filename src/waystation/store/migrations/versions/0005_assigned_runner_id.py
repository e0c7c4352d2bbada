"""jobs.assigned_runner_id: the holding runner's id as it registered

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-04 17:20:00.000000
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

from waystation.protocol import vagrant_server_pb2 as vs

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.add_column("jobs", sa.Column("assigned_runner_id", sa.Text(), nullable=True))
    # Jobs held now get their runner's id as it registered (runners keep it in
    # their message); assigned_runner stays the lowercased key they match on.
    conn = op.get_bind()
    runners = sa.table("runners", sa.column("id", sa.Text), sa.column("data", sa.LargeBinary))
    jobs = sa.table(
        "jobs",
        sa.column("kind", sa.Text),
        sa.column("assigned_runner", sa.Text),
        sa.column("assigned_runner_id", sa.Text),
    )
    held = sa.select(jobs.c.assigned_runner).where(
        jobs.c.kind == "vagrant", jobs.c.assigned_runner.is_not(None)
    )
    for key, data in conn.execute(
        sa.select(runners.c.id, runners.c.data).where(runners.c.id.in_(held))
    ):
        conn.execute(
            sa.update(jobs)
            .where(jobs.c.kind == "vagrant", jobs.c.assigned_runner == key)
            .values(assigned_runner_id=vs.Runner.FromString(data).id)
        )


def downgrade() -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_column("assigned_runner_id")
