"""The database schema: one table per record kind.

Each record keeps its whole protocol message in `data` (so every field
round-trips, including ones added upstream later) and copies into columns only
what is looked up, joined or kept unique. References between records
(`basis.projects`, `project.targets`) are foreign keys, not copies, so they can
never drift; the message lists are rebuilt from them on read.

Changing this file means adding an Alembic migration under migrations/versions
(a test compares the two).
"""

from __future__ import annotations

import sqlalchemy as sa

metadata = sa.MetaData(
    naming_convention={
        "ix": "ix_%(table_name)s_%(column_0_N_name)s",
        "uq": "uq_%(table_name)s_%(column_0_N_name)s",
        "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
        "pk": "pk_%(table_name)s",
    }
)

bases = sa.Table(
    "bases",
    metadata,
    sa.Column("resource_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    # Names are unique ignoring case; `name_key` is the lowercased name.
    sa.Column("name_key", sa.Text, nullable=False, unique=True),
    sa.Column("path", sa.Text, nullable=False, unique=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

projects = sa.Table(
    "projects",
    metadata,
    sa.Column("resource_id", sa.Text, primary_key=True),
    sa.Column(
        "basis_id",
        sa.Text,
        sa.ForeignKey("bases.resource_id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("name_key", sa.Text, nullable=False),
    sa.Column("path", sa.Text, nullable=False, unique=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.UniqueConstraint("basis_id", "name_key"),
)

targets = sa.Table(
    "targets",
    metadata,
    sa.Column("resource_id", sa.Text, primary_key=True),
    sa.Column(
        "project_id",
        sa.Text,
        sa.ForeignKey("projects.resource_id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("name_key", sa.Text, nullable=False),
    sa.Column("uuid", sa.Text, nullable=False, unique=True),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.UniqueConstraint("project_id", "name_key"),
)

boxes = sa.Table(
    "boxes",
    metadata,
    sa.Column("resource_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False, index=True),
    sa.Column("version", sa.Text, nullable=False),
    sa.Column("provider", sa.Text, nullable=False),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.UniqueConstraint("name", "version", "provider"),
)
