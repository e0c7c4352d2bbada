"""provisioning: templates, workspaces, builds, quotas, provisioner jobs and daemons

Revision ID: 0004
Revises: 0003
Create Date: 2026-11-22 23:19:18.861805
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "provisioner_daemons",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("provisioners", sa.Text(), nullable=False),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.Column("first_seen", sa.BigInteger(), nullable=False),
        sa.Column("last_seen", sa.BigInteger(), nullable=False),
        sa.Column("online_until", sa.BigInteger(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_provisioner_daemons")),
    )
    op.create_table(
        "quotas",
        sa.Column("user", sa.Text(), nullable=False),
        sa.Column("allowance", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("user", name=op.f("pk_quotas")),
    )
    op.create_table(
        "templates",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("name_key", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("active_version_id", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_templates")),
        sa.UniqueConstraint("name_key", name=op.f("uq_templates_name_key")),
    )
    op.create_table(
        "provisioner_job_tags",
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("tag", sa.Text(), nullable=False),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_provisioner_job_tags_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", "tag", name=op.f("pk_provisioner_job_tags")),
    )
    op.create_table(
        "provisioner_jobs",
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("provisioner", sa.Text(), nullable=False),
        sa.Column("tags", sa.Text(), nullable=False),
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("template_version_id", sa.Text(), nullable=False),
        sa.Column("workspace_build_id", sa.Text(), nullable=True),
        sa.Column("input", sa.LargeBinary(), nullable=False),
        sa.Column("error_code", sa.Text(), nullable=True),
        sa.Column("updated_at", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["job_id"],
            ["jobs.id"],
            name=op.f("fk_provisioner_jobs_job_id_jobs"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("job_id", name=op.f("pk_provisioner_jobs")),
    )
    with op.batch_alter_table("provisioner_jobs", schema=None) as batch_op:
        batch_op.create_index(
            batch_op.f("ix_provisioner_jobs_template_version_id"),
            ["template_version_id"],
            unique=False,
        )

    op.create_table(
        "template_versions",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("template_id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("number", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("archive", sa.LargeBinary(), nullable=False),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["template_id"],
            ["templates.id"],
            name=op.f("fk_template_versions_template_id_templates"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_template_versions")),
        sa.UniqueConstraint(
            "template_id", "name", name=op.f("uq_template_versions_template_id_name")
        ),
        sa.UniqueConstraint(
            "template_id", "number", name=op.f("uq_template_versions_template_id_number")
        ),
    )
    op.create_table(
        "workspaces",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("name_key", sa.Text(), nullable=False),
        sa.Column("owner", sa.Text(), nullable=False),
        sa.Column("template_id", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("deleted_at", sa.BigInteger(), nullable=True),
        sa.ForeignKeyConstraint(
            ["template_id"], ["templates.id"], name=op.f("fk_workspaces_template_id_templates")
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workspaces")),
    )
    with op.batch_alter_table("workspaces", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_workspaces_owner"), ["owner"], unique=False)
        batch_op.create_index(
            "uq_workspaces_live_name",
            ["owner", "name_key"],
            unique=True,
            sqlite_where=sa.text("deleted_at IS NULL"),
            postgresql_where=sa.text("deleted_at IS NULL"),
        )

    op.create_table(
        "workspace_builds",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("workspace_id", sa.Text(), nullable=False),
        sa.Column("build_number", sa.Integer(), nullable=False),
        sa.Column("transition", sa.SmallInteger(), nullable=False),
        sa.Column("template_version_id", sa.Text(), nullable=False),
        sa.Column("job_id", sa.Text(), nullable=False),
        sa.Column("created_at", sa.BigInteger(), nullable=False),
        sa.Column("daily_cost", sa.Integer(), server_default="0", nullable=False),
        sa.Column("state", sa.LargeBinary(), nullable=True),
        sa.Column("data", sa.LargeBinary(), nullable=False),
        sa.ForeignKeyConstraint(
            ["workspace_id"],
            ["workspaces.id"],
            name=op.f("fk_workspace_builds_workspace_id_workspaces"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_workspace_builds")),
        sa.UniqueConstraint(
            "workspace_id",
            "build_number",
            name=op.f("uq_workspace_builds_workspace_id_build_number"),
        ),
    )
    with op.batch_alter_table("workspace_builds", schema=None) as batch_op:
        batch_op.create_index(batch_op.f("ix_workspace_builds_job_id"), ["job_id"], unique=False)

    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.add_column(sa.Column("kind", sa.Text(), server_default="vagrant", nullable=False))


def downgrade() -> None:
    with op.batch_alter_table("jobs", schema=None) as batch_op:
        batch_op.drop_column("kind")

    with op.batch_alter_table("workspace_builds", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_workspace_builds_job_id"))

    op.drop_table("workspace_builds")
    with op.batch_alter_table("workspaces", schema=None) as batch_op:
        batch_op.drop_index(
            "uq_workspaces_live_name",
            sqlite_where=sa.text("deleted_at IS NULL"),
            postgresql_where=sa.text("deleted_at IS NULL"),
        )
        batch_op.drop_index(batch_op.f("ix_workspaces_owner"))

    op.drop_table("workspaces")
    op.drop_table("template_versions")
    with op.batch_alter_table("provisioner_jobs", schema=None) as batch_op:
        batch_op.drop_index(batch_op.f("ix_provisioner_jobs_template_version_id"))

    op.drop_table("provisioner_jobs")
    op.drop_table("provisioner_job_tags")
    op.drop_table("templates")
    op.drop_table("quotas")
    op.drop_table("provisioner_daemons")
