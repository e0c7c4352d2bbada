"""The roles a user can hold (issue #21), shared by the store, the guard and the CLI."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Role(enum.StrEnum):
    """What a user may do; auth/policy.py maps every RPC to the roles allowed it."""

    ADMIN = "admin"  # everything
    MEMBER = "member"  # a person: reads, jobs, templates, their own workspaces
    RUNNER = "runner"  # a Vagrant runner: its job stream and the state plugins touch
    PROVISIONER = "provisioner"  # a provisioner daemon: provisionerd only


# The user an upgraded server's tokens name (upstream's only user), and the
# first user bootstrap makes when not told a name.
LEGACY_USER = "vagrant"
BOOTSTRAP_USER = "admin"
MAX_USER_NAME = 64


def user_name_problem(name: str) -> str:
    """Why `name` cannot name a user ("" if it can)."""
    if not name or len(name) > MAX_USER_NAME:
        return f"a user name is 1 to {MAX_USER_NAME} characters"
    if not all(c.isalnum() or c in "-_.@" for c in name) or not name[0].isalnum():
        return "a user name starts with a letter or digit and holds only those and - _ . @"
    return ""


@dataclass(frozen=True)
class Actor:
    """Who made a change, as the audit log records it (the store's view of a caller)."""

    user: str
    token_id: str = ""  # hex; empty for the local operator (`server keys`)
    peer: str = ""  # the gRPC peer address
