"""Who may call what (issue #21): one table, every RPC of every service.

Two steps, so that an HTTP API added later maps its routes to the same rules:
`ACTIONS` gives each action (a name such as ``jobs.queue``) the roles allowed
it; `METHODS` maps each full gRPC method path to its action. `PUBLIC` methods
need no token at all. tests/test_policy.py walks every service's descriptor:
a method missing here fails it, so a new RPC cannot slip in unguarded.

Owner-scoped actions (`OWNER_SCOPED`) are allowed to a member only on their own
workspace; the handler checks that with the principal the guard hands it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Final

from waystation.core.roles import Role

ADMIN: Final = frozenset({Role.ADMIN})
PEOPLE: Final = frozenset({Role.ADMIN, Role.MEMBER})
PEOPLE_AND_RUNNERS: Final = frozenset({Role.ADMIN, Role.MEMBER, Role.RUNNER})
RUNNERS: Final = frozenset({Role.ADMIN, Role.RUNNER})
PROVISIONERS: Final = frozenset({Role.ADMIN, Role.PROVISIONER})
EVERYONE: Final = frozenset(Role)

ACTIONS: Final[Mapping[str, frozenset[Role]]] = {
    # Vagrant state: runner plugins read it and, setting up a job, upsert the
    # basis, project and target (docs/protocols.md section 3) and boxes.
    "state.read": PEOPLE_AND_RUNNERS,
    "state.write": PEOPLE_AND_RUNNERS,
    "state.delete_scope": PEOPLE,  # a basis or project and all under it
    "jobs.read": PEOPLE,
    "jobs.queue": PEOPLE,
    "jobs.cancel": PEOPLE,
    "jobs.prune": ADMIN,
    "runners.read": PEOPLE_AND_RUNNERS,
    "runners.work": RUNNERS,  # RunnerConfig, RunnerJobStream
    "daemons.read": PEOPLE,
    "provisioner.work": PROVISIONERS,  # provisionerd.ProvisionerDaemon
    "templates.read": PEOPLE,
    "templates.push": PEOPLE,
    "templates.dry_run": PEOPLE,
    "workspaces.read": PEOPLE,
    "workspaces.create": PEOPLE,  # owner-scoped
    "workspaces.build": PEOPLE,  # owner-scoped
    "workspaces.cancel": PEOPLE,  # owner-scoped: a build's job, or any job
    "quotas.read": PEOPLE,
    "quotas.set": ADMIN,
    # Anyone may mint a login token for themselves; for others, admins only.
    "tokens.login": EVERYONE,
    "tokens.invite": ADMIN,
    # Anyone may revoke and list their own; others', admins only (the handler checks).
    "tokens.revoke": EVERYONE,
    "tokens.list": EVERYONE,
    "users.manage": ADMIN,
    "users.whoami": EVERYONE,
    "audit.read": ADMIN,
    "snapshots.take": ADMIN,
    "snapshots.restore": ADMIN,
    "config.read": ADMIN,
    "config.set": ADMIN,
}

OWNER_SCOPED: Final = frozenset({"workspaces.create", "workspaces.build", "workspaces.cancel"})

_VAGRANT = "/hashicorp.vagrant.Vagrant/"
_PROVISIONING = "/waystation.v1.Provisioning/"
_ADMIN = "/waystation.v1.Admin/"
_DAEMON = "/provisionerd.ProvisionerDaemon/"
_USERS = "/waystation.v1.Users/"


def _methods(prefix: str, action: str, *names: str) -> dict[str, str]:
    return {prefix + name: action for name in names}


PUBLIC: Final = frozenset(
    _VAGRANT + m for m in ("GetVersionInfo", "BootstrapToken", "ConvertInviteToken")
)

METHODS: Final[Mapping[str, str]] = {
    **_methods(
        _VAGRANT,
        "state.read",
        *("GetBasis", "FindBasis", "ListBasis", "GetProject", "FindProject", "ListProjects"),
        *("GetTarget", "FindTarget", "ListTargets", "GetBox", "ListBoxes", "FindBox"),
    ),
    **_methods(
        _VAGRANT,
        "state.write",
        *("UpsertBasis", "UpsertProject", "UpsertTarget", "DeleteTarget"),
        *("UpsertBox", "DeleteBox"),
    ),
    **_methods(_VAGRANT, "jobs.read", "GetJob", "_ListJobs", "GetJobStream", "GetLogStream"),
    **_methods(_VAGRANT, "jobs.queue", "QueueJob", "ValidateJob"),
    **_methods(_VAGRANT, "jobs.cancel", "CancelJob"),
    **_methods(_VAGRANT, "jobs.prune", "PruneOldJobs"),
    **_methods(_VAGRANT, "runners.read", "GetRunner"),
    **_methods(_VAGRANT, "runners.work", "RunnerConfig", "RunnerJobStream"),
    **_methods(_VAGRANT, "tokens.login", "GenerateLoginToken"),
    **_methods(_VAGRANT, "tokens.invite", "GenerateInviteToken"),
    **_methods(
        _DAEMON,
        "provisioner.work",
        *("AcquireJob", "AcquireJobWithCancel", "CommitQuota", "UpdateJob", "FailJob"),
        "CompleteJob",
    ),
    **_methods(_PROVISIONING, "templates.push", "PushTemplate"),
    **_methods(
        _PROVISIONING,
        "templates.read",
        *("ListTemplates", "ListTemplateVersions", "GetTemplateVersion"),
    ),
    **_methods(_PROVISIONING, "templates.dry_run", "DryRun"),
    **_methods(_PROVISIONING, "workspaces.create", "CreateWorkspace"),
    **_methods(_PROVISIONING, "workspaces.build", "BuildWorkspace"),
    **_methods(_PROVISIONING, "workspaces.read", "ListWorkspaces", "GetWorkspace"),
    **_methods(_PROVISIONING, "workspaces.cancel", "CancelProvisionerJob"),
    **_methods(_PROVISIONING, "quotas.set", "SetQuota"),
    **_methods(_PROVISIONING, "quotas.read", "GetQuota"),
    **_methods(
        _PROVISIONING,
        "jobs.read",
        *("ListProvisionerJobs", "GetProvisionerJob", "WatchProvisionerJob"),
    ),
    **_methods(_PROVISIONING, "daemons.read", "ListProvisionerDaemons"),
    **_methods(_ADMIN, "state.delete_scope", "DeleteBasis", "DeleteProject"),
    **_methods(_ADMIN, "config.set", "ConfigSet"),
    **_methods(_ADMIN, "config.read", "ConfigGet"),
    **_methods(_ADMIN, "jobs.read", "GetQueuePosition"),
    **_methods(_ADMIN, "tokens.revoke", "RevokeToken"),
    **_methods(_ADMIN, "runners.read", "ListRunners"),
    **_methods(_ADMIN, "snapshots.take", "CreateSnapshot"),
    **_methods(_ADMIN, "snapshots.restore", "RestoreSnapshot"),
    **_methods(
        _USERS,
        "users.manage",
        *("CreateUser", "ListUsers", "GetUser", "SetUserRole", "DisableUser", "DeleteUser"),
    ),
    **_methods(_USERS, "users.whoami", "WhoAmI"),
    **_methods(_USERS, "tokens.list", "ListTokens"),
    **_methods("/waystation.v1.Audit/", "audit.read", "ListAuditEvents"),
}


@dataclass(frozen=True)
class Principal:
    """Who is calling: what the guard hands a handler, for owner checks and audit."""

    user: str
    role: Role
    token_id: str  # hex
    peer: str = ""

    @property
    def admin(self) -> bool:
        return self.role is Role.ADMIN


def action_of(method: str) -> str | None:
    """The action a gRPC method performs; None for a method the table lacks."""
    return METHODS.get(method)


def refusal(action: str, principal: Principal) -> str:
    """Why `principal` may not perform `action` ("" if it may)."""
    allowed = ACTIONS[action]
    if principal.role in allowed:
        return ""
    needed = " or ".join(sorted(r.value for r in allowed if r is not Role.ADMIN)) or "admin"
    if needed != "admin":
        needed += " (or admin)"
    article = "an" if principal.role.value[0] in "aeiou" else "a"
    return (
        f"this call needs the {needed} role; your token's user {principal.user} "
        f"is {article} {principal.role.value}"
    )


def owner_refusal(principal: Principal, owner: str, what: str) -> str:
    """Why `principal` may not act on `what` owned by `owner` ("" if it may)."""
    if principal.admin or owner.lower() == principal.user.lower():
        return ""
    return (
        f"{what} belongs to {owner}: only its owner or an admin may do this; "
        f"your token's user is {principal.user}"
    )
