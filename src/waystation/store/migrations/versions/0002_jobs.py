"""jobs, job output, runners, config vars

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-22 20:45:29.537100
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "config_vars",
        sa.Column("scope_kind", sa.Text(), nullable=False),
        sa.Column("scope_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("value", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("scope_kind", "scope_id", "name", name=op.f("pk_config_vars")),
    )
    op.create_table(
        "jobs",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("state", sa.SmallInteger(), nullable=False),
        sa.Column("operation", sa.Text(), nullable=False),
        sa.Column("scope_key", sa.Text(), nullable=True),
        sa.Column("basis_id", sa.Text(), nullable=True),
        sa.Column("project_id", sa.Text(), nullable=True),
        sa.Column("target_id", sa.Text(), nullable=True),
        sa.Column("runner_id", sa.Text(), nullable=True),
        sa.Column("assigned_runner", sa.Text(), nullable=True),
        sa.Column("queue_time", sa.BigInteger(), nullable=False),
        sa.Column("assign_time", sa.BigInteger(), nullable=True),
        sa.Column("ack_time", sa.BigInteger(), nullable=True),
        sa.Column("complete_time", sa.BigInteger(), nullable=True),
        sa.Column("cancel_time", sa.BigInteger(), nullable=True),
        sa.Column("expire_time", sa.BigInteger(), nullable=True),
        sa.Column("ack_deadline", sa.BigInteger(), nullable=True),
        sa.Column("heartbeat_deadline", sa.BigInteger(), nullable=True),
        sa.Column("error", sa.LargeBinary(), nullable=True),
        sa.Column("result", sa.LargeBinary(), nullable=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_jobs")),
    )
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_jobs_ack_deadline"), ["ack_deadline"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_basis_id"), ["basis_id"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_expire_time"), ["expire_time"], unique=False)
        batch_op.create_index(
            batch_op.f("ix_jobs_heartbeat_deadline"), ["heartbeat_deadline"], unique=False
        )
        batch_op.create_index(batch_op.f("ix_jobs_project_id"), ["project_id"], unique=False)
        batch_op.create_index(
            "ix_jobs_state_complete_time", ["state", "complete_time"], unique=False
        )
        batch_op.create_index("ix_jobs_state_queue_time", ["state", "queue_time"], unique=False)
        batch_op.create_index(batch_op.f("ix_jobs_target_id"), ["target_id"], unique=False)
        batch_op.create_index(
            "uq_jobs_held_scope",
            ["scope_key"],
            unique=True,
            sqlite_where=sa.text("state IN (2, 3) AND scope_key IS NOT NULL"),
            postgresql_where=sa.text("state IN (2, 3) AND scope_key IS NOT NULL"),
        )

    op.create_table(
        "runners",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("by_id_only", sa.Boolean(), nullable=False),
        sa.Column("first_seen", sa.BigInteger(), nullable=False),
        sa.Column("last_seen", sa.BigInteger(), nullable=False),
        sa.Column("online_until", sa.BigInteger(), nullable=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_runners")),
    )
    op.create_table(
        "job_output",
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("seq", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"], ["jobs.id"], name=op.f("fk_job_output_job_id_jobs"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("job_id", "seq", name=op.f("pk_job_output")),
    )


def downgrade() -> None:

    op.drop_table("job_output")
    op.drop_table("runners")
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_jobs_held_scope",
            sqlite_where=sa.text("state IN (2, 3) AND scope_key IS NOT NULL"),
            postgresql_where=sa.text("state IN (2, 3) AND scope_key IS NOT NULL"),
        )
        batch_op.drop_index(batch_op.f("ix_jobs_target_id"))
        batch_op.drop_index("ix_jobs_state_queue_time")
        batch_op.drop_index("ix_jobs_state_complete_time")
        batch_op.drop_index(batch_op.f("ix_jobs_project_id"))
        batch_op.drop_index(batch_op.f("ix_jobs_heartbeat_deadline"))
        batch_op.drop_index(batch_op.f("ix_jobs_expire_time"))
        batch_op.drop_index(batch_op.f("ix_jobs_basis_id"))
        batch_op.drop_index(batch_op.f("ix_jobs_ack_deadline"))

    op.drop_table("jobs")
    op.drop_table("config_vars")
