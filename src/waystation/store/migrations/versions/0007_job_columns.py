"""jobs' columns named for what they hold, for jobs of every kind

assigned_runner -> holder_key (a runner's lowercased id or a daemon's id),
assigned_runner_id -> holder_id, heartbeat_deadline -> liveness_deadline (a
runner's heartbeat timeout, a daemon's hang timeout). Values are unchanged.

Revision ID: 0007
Revises: 0006
Create Date: 2026-12-04 18:20:00.000000
"""

from __future__ import annotations

from alembic import op

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None

_RENAMES = (
    ("assigned_runner", "holder_key"),
    ("assigned_runner_id", "holder_id"),
    ("heartbeat_deadline", "liveness_deadline"),
)


def _rename(renames: tuple[tuple[str, str], ...], old_index: str, new_index: str) -> None:
    with op.batch_alter_table("jobs") as batch:
        batch.drop_index(old_index)
        for old, new in renames:
            batch.alter_column(old, new_column_name=new)
    with op.batch_alter_table("jobs") as batch:
        column = new_index.removeprefix("ix_jobs_")
        batch.create_index(new_index, [column], unique=False)


def upgrade() -> None:
    _rename(_RENAMES, "ix_jobs_heartbeat_deadline", "ix_jobs_liveness_deadline")


def downgrade() -> None:
    back = tuple((new, old) for old, new in _RENAMES)
    _rename(back, "ix_jobs_liveness_deadline", "ix_jobs_heartbeat_deadline")
