"""The store: waystation's one way to the database.

`Store` is the typed interface of domain verbs, named noun_verb and grouped
by aggregate (`store.verbs`: state, jobs and output, runners, templates,
workspaces, quotas, daemons, provisioner jobs, tokens and keys, snapshots).
Each verb is one transaction: a plain function of a connection in this
package's module for its aggregate (resources.py, jobs.py, templates.py, ...),
run whole by the private `Database` (group commit; see database.py). Nothing
outside this package writes SQL or sees the database.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa

from waystation.files import private_dir, private_file
from waystation.store.database import Database
from waystation.store.migrate import upgrade
from waystation.store.verbs.audit import AuditVerbs
from waystation.store.verbs.auth import AuthVerbs
from waystation.store.verbs.jobs import JobVerbs
from waystation.store.verbs.provisioning import (
    DaemonVerbs,
    ProvisionerJobVerbs,
    QuotaVerbs,
    TemplateVerbs,
    WorkspaceVerbs,
)
from waystation.store.verbs.runners import RunnerVerbs
from waystation.store.verbs.snapshots import SnapshotVerbs
from waystation.store.verbs.state import StateVerbs

log = logging.getLogger(__name__)

__all__ = ["Store"]


def _private_sqlite(path: Path) -> None:
    """The database holds the token signing keys: it is 0600 before SQLite opens
    it, and SQLite gives its -wal and -shm files the database's mode."""
    private_dir(path.parent)
    private_file(path)
    for suffix in ("-wal", "-shm"):  # left by an older version, perhaps looser
        companion = path.with_name(path.name + suffix)
        if companion.exists():
            private_file(companion)


class Store(
    StateVerbs,
    JobVerbs,
    RunnerVerbs,
    TemplateVerbs,
    WorkspaceVerbs,
    QuotaVerbs,
    DaemonVerbs,
    ProvisionerJobVerbs,
    AuthVerbs,
    AuditVerbs,
    SnapshotVerbs,
):
    """Every verb of the store; open one with `Store.open(url)`."""

    def __init__(self, db: Database) -> None:
        self._db = db

    @classmethod
    def open(cls, url: str, *, fsync: bool = True) -> Store:
        """Connect, migrate the schema to the newest revision, start the writers."""
        db = Database(url, fsync=fsync)
        database = sa.make_url(db.url).database
        if db.dialect == "sqlite" and database and database != ":memory:":
            _private_sqlite(Path(database))
        db.run_sync(upgrade)
        db.start()
        log.info("store open: %s (fsync %s)", db.dialect, "on" if fsync else "off")
        return cls(db)

    async def close(self) -> None:
        """Commit what is queued, stop the writers, close the connections."""
        await self._db.close()

    @property
    def url(self) -> str:
        """The database URL, as normalized."""
        return self._db.url

    @property
    def dialect(self) -> str:
        """`sqlite` or `postgresql`."""
        return self._db.dialect

    @property
    def reads_inline(self) -> bool:
        """Reads run on the event loop (SQLite): cheap enough to look before a write."""
        return self._db.reads_inline
