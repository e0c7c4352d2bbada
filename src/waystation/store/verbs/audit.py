"""Verbs of the audit log."""

from __future__ import annotations

from waystation.core.roles import Actor
from waystation.store import audit as audit_tx
from waystation.store.audit import AuditEntry
from waystation.store.verbs.base import Pending, Verbs


class AuditVerbs(Verbs):
    def audit_record(self, actor: Actor, action: str, obj: str, now: int) -> Pending[None]:
        """Record an action that changes no row of its own (a token minted, a snapshot taken)."""
        return self._db.write(audit_tx.record, actor, action, obj, now)

    def audit_list(
        self, user: str, action: str, since: int, limit: int
    ) -> Pending[list[AuditEntry]]:
        """Audit entries since `since`, newest first, by user and action if given."""
        return self._db.read(audit_tx.audit_list, user, action, since, limit)

    def audit_prune(self, before: int) -> Pending[int]:
        """Delete audit entries older than `before`; how many."""
        return self._db.write(audit_tx.audit_prune, before)
