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

# -- jobs (the job engine's durable state) -------------------------------------
# Times are integer microseconds since the epoch. The row's columns are the
# truth for every server-side field; `data` keeps the Job as it was queued.

jobs = sa.Table(
    "jobs",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    # "vagrant" (runner protocol) or "provisioner" (provisioner daemons; see
    # provisioner_jobs): one state machine, two wire protocols.
    sa.Column("kind", sa.Text, nullable=False, server_default="vagrant"),
    sa.Column("state", sa.SmallInteger, nullable=False),
    # Vagrant: the Job's operation; provisioner: the job type.
    sa.Column("operation", sa.Text, nullable=False),
    # The serialization scope a Command job holds while WAITING or RUNNING.
    sa.Column("scope_key", sa.Text),
    sa.Column("basis_id", sa.Text, index=True),
    sa.Column("project_id", sa.Text, index=True),
    sa.Column("target_id", sa.Text, index=True),
    # The runner it must run on, lowercased; NULL means any runner.
    sa.Column("runner_id", sa.Text),
    # Who holds the job (WAITING or RUNNING), as holders match: a runner's id
    # lowercased (runners match ignoring case), a provisioner daemon's as it came.
    sa.Column("holder_key", sa.Text),
    # A runner holder's id exactly as it registered: what goes back on the wire.
    sa.Column("holder_id", sa.Text),
    sa.Column("queue_time", sa.BigInteger, nullable=False),
    sa.Column("assign_time", sa.BigInteger),
    sa.Column("ack_time", sa.BigInteger),
    sa.Column("complete_time", sa.BigInteger),
    sa.Column("cancel_time", sa.BigInteger),
    sa.Column("expire_time", sa.BigInteger, index=True),
    # Timers are deadlines here, so they survive restarts and any replica may
    # fire them; each transition sets or clears them, so none goes stale.
    sa.Column("ack_deadline", sa.BigInteger, index=True),
    # A RUNNING job's holder must be heard from by then: a runner's heartbeat
    # timeout, a provisioner daemon's hang timeout (UpdateJob is its heartbeat).
    sa.Column("liveness_deadline", sa.BigInteger, index=True),
    sa.Column("error", sa.LargeBinary),
    sa.Column("result", sa.LargeBinary),
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.Index("ix_jobs_state_queue_time", "state", "queue_time"),
    sa.Index("ix_jobs_state_complete_time", "state", "complete_time"),
    # The database itself refuses a second held job in one scope, so two
    # replicas cannot both assign commands for the same machine.
    sa.Index(
        "uq_jobs_held_scope",
        "scope_key",
        unique=True,
        sqlite_where=sa.text("state IN (2, 3) AND scope_key IS NOT NULL"),
        postgresql_where=sa.text("state IN (2, 3) AND scope_key IS NOT NULL"),
    ),
)

job_output = sa.Table(
    "job_output",
    metadata,
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("seq", sa.Integer, primary_key=True, autoincrement=False),
    # One GetJobStreamResponse.Terminal (a batch of events) as the runner sent it.
    sa.Column("data", sa.LargeBinary, nullable=False),
)

runners = sa.Table(
    "runners",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),  # lowercased: ids match ignoring case
    sa.Column("by_id_only", sa.Boolean, nullable=False),
    sa.Column("first_seen", sa.BigInteger, nullable=False),
    sa.Column("last_seen", sa.BigInteger, nullable=False),
    # Online while a server holding its config stream keeps renewing this.
    sa.Column("online_until", sa.BigInteger),
    sa.Column("data", sa.LargeBinary, nullable=False),
)

config_vars = sa.Table(
    "config_vars",
    metadata,
    # basis, project, target or runner; scope_id is a resource id, a lowercased
    # runner id, or "*" for the any-runner scope.
    sa.Column("scope_kind", sa.Text, primary_key=True),
    sa.Column("scope_id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, primary_key=True),
    sa.Column("value", sa.Text, nullable=False),
)

# -- authentication ---------------------------------------------------------------

auth_keys = sa.Table(
    "auth_keys",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),  # k1, k2, ...: the token's key_id
    sa.Column("key", sa.LargeBinary, nullable=False),  # 32 bytes for keyed BLAKE2b
    sa.Column("created_at", sa.BigInteger, nullable=False),
    # A retired key verifies nothing; the newest active key signs.
    sa.Column("retired_at", sa.BigInteger),
)

server_flags = sa.Table(
    "server_flags",
    metadata,
    sa.Column("name", sa.Text, primary_key=True),  # e.g. "bootstrapped": set once, ever
    sa.Column("set_at", sa.BigInteger, nullable=False),
)

revoked_tokens = sa.Table(
    "revoked_tokens",
    metadata,
    sa.Column("token_id", sa.Text, primary_key=True),  # hex of Token.token_id
    sa.Column("revoked_at", sa.BigInteger, nullable=False),
)

users = sa.Table(
    "users",
    metadata,
    # Names are unique ignoring case; `name_key` is the lowercased name, and
    # Token.user carries the name as created.
    sa.Column("name_key", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("role", sa.Text, nullable=False),  # core.roles.Role
    sa.Column("created_at", sa.BigInteger, nullable=False),
    # A disabled user's tokens are refused at once: the guard reads this row per call.
    sa.Column("disabled_at", sa.BigInteger),
)

# Tokens minted since users existed (issue #21): for listing and for what the
# token itself does not carry (its label, an invite's role). Checking a token
# needs no row: older tokens have none and keep working.
tokens = sa.Table(
    "tokens",
    metadata,
    sa.Column("token_id", sa.Text, primary_key=True),  # hex of Token.token_id
    sa.Column("user", sa.Text, nullable=False),
    sa.Column("user_key", sa.Text, nullable=False, index=True),  # lowercased
    sa.Column("kind", sa.Text, nullable=False),  # login or invite
    sa.Column("label", sa.Text, nullable=False),
    sa.Column("role", sa.Text),  # an invite's: the role of the user it creates
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("expires_at", sa.BigInteger),  # NULL: never
    # Written at most once a minute per token and replica, so a call costs no write.
    sa.Column("last_used_at", sa.BigInteger),
)

# Who changed what (issue #21): written in the transaction of the change it
# records, so a change that fails leaves none; pruned after the retention.
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer, "sqlite"), primary_key=True),
    sa.Column("at", sa.BigInteger, nullable=False, index=True),
    sa.Column("user", sa.Text, nullable=False),
    sa.Column("token_id", sa.Text, nullable=False),
    sa.Column("action", sa.Text, nullable=False),  # e.g. user.create, token.revoke
    sa.Column("object", sa.Text, nullable=False),
    sa.Column("outcome", sa.Text, nullable=False),
    sa.Column("peer", sa.Text, nullable=False),
)


# -- provisioning (Coder-style templates, workspaces and their jobs) ---------------
# A provisioner job is a `jobs` row (state, times, holder, timers: the shared
# engine) plus what only daemons need, here.

provisioner_jobs = sa.Table(
    "provisioner_jobs",
    metadata,
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("provisioner", sa.Text, nullable=False),
    sa.Column("tags", sa.Text, nullable=False),  # JSON object, sorted keys
    sa.Column("owner", sa.Text, nullable=False),
    sa.Column("template_version_id", sa.Text, nullable=False, index=True),
    sa.Column("workspace_build_id", sa.Text),
    # The AcquiredJob to send, less what is filled at acquisition (id, times,
    # the template's archive).
    sa.Column("input", sa.LargeBinary, nullable=False),
    sa.Column("error_code", sa.Text),
    sa.Column("updated_at", sa.BigInteger),
)

# One row per tag of a job, `["key", "value"]`: a job fits a daemon when none
# of its rows is missing from the daemon's tags (a subset test in SQL).
provisioner_job_tags = sa.Table(
    "provisioner_job_tags",
    metadata,
    sa.Column("job_id", sa.Text, sa.ForeignKey("jobs.id", ondelete="CASCADE"), primary_key=True),
    sa.Column("tag", sa.Text, primary_key=True),
)

provisioner_daemons = sa.Table(
    "provisioner_daemons",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("provisioners", sa.Text, nullable=False),  # JSON list
    sa.Column("tags", sa.Text, nullable=False),  # JSON object
    sa.Column("first_seen", sa.BigInteger, nullable=False),
    sa.Column("last_seen", sa.BigInteger, nullable=False),
    # Connected while this is in the future: renewed while it waits for work or
    # reports on a job, cleared when it says goodbye (CancelAcquire).
    sa.Column("online_until", sa.BigInteger),
)

templates = sa.Table(
    "templates",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("name_key", sa.Text, nullable=False, unique=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("active_version_id", sa.Text),
)

template_versions = sa.Table(
    "template_versions",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column(
        "template_id",
        sa.Text,
        sa.ForeignKey("templates.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("number", sa.Integer, nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("job_id", sa.Text, nullable=False),
    sa.Column("archive", sa.LargeBinary, nullable=False),
    # The TemplateVersion message: inputs, then what the import found.
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.UniqueConstraint("template_id", "name"),
    sa.UniqueConstraint("template_id", "number"),
)

workspaces = sa.Table(
    "workspaces",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("name_key", sa.Text, nullable=False),
    sa.Column("owner", sa.Text, nullable=False, index=True),
    sa.Column("template_id", sa.Text, sa.ForeignKey("templates.id"), nullable=False),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("deleted_at", sa.BigInteger),
    # Live workspace names are unique per owner; deleted ones free theirs.
    sa.Index(
        "uq_workspaces_live_name",
        "owner",
        "name_key",
        unique=True,
        sqlite_where=sa.text("deleted_at IS NULL"),
        postgresql_where=sa.text("deleted_at IS NULL"),
    ),
)

workspace_builds = sa.Table(
    "workspace_builds",
    metadata,
    sa.Column("id", sa.Text, primary_key=True),
    sa.Column(
        "workspace_id",
        sa.Text,
        sa.ForeignKey("workspaces.id", ondelete="CASCADE"),
        nullable=False,
    ),
    sa.Column("build_number", sa.Integer, nullable=False),
    sa.Column("transition", sa.SmallInteger, nullable=False),
    sa.Column("template_version_id", sa.Text, nullable=False),
    sa.Column("job_id", sa.Text, nullable=False, index=True),
    sa.Column("created_at", sa.BigInteger, nullable=False),
    sa.Column("daily_cost", sa.Integer, nullable=False, server_default="0"),
    sa.Column("state", sa.LargeBinary),  # the provisioner's, carried to the next build
    # The WorkspaceBuild message: parameters and, once done, resources.
    sa.Column("data", sa.LargeBinary, nullable=False),
    sa.UniqueConstraint("workspace_id", "build_number"),
)

quotas = sa.Table(
    "quotas",
    metadata,
    sa.Column("user", sa.Text, primary_key=True),
    sa.Column("allowance", sa.Integer, nullable=False),
)
