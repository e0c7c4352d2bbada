"""initial schema: bases, projects, targets, boxes

Revision ID: 0001
Revises:
Create Date: 2026-11-22 20:35:38.923146
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:

    op.create_table(
        "bases",
        sa.Column("resource_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("name_key", sa.Text(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("resource_id", name=op.f("pk_bases")),
        sa.UniqueConstraint("name_key", name=op.f("uq_bases_name_key")),
        sa.UniqueConstraint("path", name=op.f("uq_bases_path")),
    )
    op.create_table(
        "boxes",
        sa.Column("resource_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("version", sa.Text(), nullable=False),
        sa.Column("provider", sa.Text(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.PrimaryKeyConstraint("resource_id", name=op.f("pk_boxes")),
        sa.UniqueConstraint(
            "name", "version", "provider", name=op.f("uq_boxes_name_version_provider")
        ),
    )
    with op.batch_alter_table("boxes", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_boxes_name"), ["name"], unique=False)

    op.create_table(
        "projects",
        sa.Column("resource_id", sa.Text(), nullable=False),
        sa.Column("basis_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("name_key", sa.Text(), nullable=False),
        sa.Column("path", sa.Text(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["basis_id"],
            ["bases.resource_id"],
            name=op.f("fk_projects_basis_id_bases"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("resource_id", name=op.f("pk_projects")),
        sa.UniqueConstraint("basis_id", "name_key", name=op.f("uq_projects_basis_id_name_key")),
        sa.UniqueConstraint("path", name=op.f("uq_projects_path")),
    )
    op.create_table(
        "targets",
        sa.Column("resource_id", sa.Text(), nullable=False),
        sa.Column("project_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("name_key", sa.Text(), nullable=False),
        sa.Column("uuid", sa.Text(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["project_id"],
            ["projects.resource_id"],
            name=op.f("fk_targets_project_id_projects"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("resource_id", name=op.f("pk_targets")),
        sa.UniqueConstraint("project_id", "name_key", name=op.f("uq_targets_project_id_name_key")),
        sa.UniqueConstraint("uuid", name=op.f("uq_targets_uuid")),
    )


def downgrade() -> None:

    op.drop_table("targets")
    op.drop_table("projects")
    with op.batch_alter_table("boxes", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_boxes_name"))

    op.drop_table("boxes")
    op.drop_table("bases")
