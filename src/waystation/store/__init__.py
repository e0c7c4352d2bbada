"""The store: waystation's one way to the database.

`Store` is the typed interface of domain verbs (`basis_upsert`, `box_find`,
...). Each verb is one transaction: a plain function in a module of this
package (resources.py, boxes.py), run whole on a database thread by
`Database`. Nothing outside this package writes SQL.
"""

from __future__ import annotations

import logging
from pathlib import Path

import sqlalchemy as sa
from google.protobuf.timestamp_pb2 import Timestamp

from waystation.files import private_dir, private_file
from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store import boxes, resources
from waystation.store.database import Database
from waystation.store.migrate import upgrade

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


class Store:
    def __init__(self, db: Database) -> None:
        self.db = db

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
        await self.db.close()

    # -- basis -------------------------------------------------------------

    async def basis_upsert(self, basis: vs.Basis) -> vs.Basis:
        return await self.db.write(resources.basis_upsert, basis)

    async def basis_get(self, ref: sdk.Ref.Basis) -> vs.Basis:
        return await self.db.read(resources.basis_get, ref)

    async def basis_find(self, basis: vs.Basis) -> vs.Basis:
        return await self.db.read(resources.basis_find, basis)

    async def basis_list(self) -> list[sdk.Ref.Basis]:
        return await self.db.read(resources.basis_list)

    async def basis_delete(self, ref: sdk.Ref.Basis) -> bool:
        return await self.db.write(resources.basis_delete, ref)

    # -- project -----------------------------------------------------------

    async def project_upsert(self, project: vs.Project) -> vs.Project:
        return await self.db.write(resources.project_upsert, project)

    async def project_get(self, ref: sdk.Ref.Project) -> vs.Project:
        return await self.db.read(resources.project_get, ref)

    async def project_find(self, project: vs.Project) -> vs.Project:
        return await self.db.read(resources.project_find, project)

    async def project_list(self) -> list[sdk.Ref.Project]:
        return await self.db.read(resources.project_list)

    async def project_delete(self, ref: sdk.Ref.Project) -> bool:
        return await self.db.write(resources.project_delete, ref)

    # -- target ------------------------------------------------------------

    async def target_upsert(self, project: sdk.Ref.Project, target: vs.Target) -> vs.Target:
        return await self.db.write(resources.target_upsert, project, target)

    async def target_get(self, project: sdk.Ref.Project, ref: sdk.Ref.Target) -> vs.Target:
        return await self.db.read(resources.target_get, project, ref)

    async def target_find(self, target: vs.Target) -> vs.Target:
        return await self.db.read(resources.target_find, target)

    async def target_list(self) -> list[sdk.Ref.Target]:
        return await self.db.read(resources.target_list)

    async def target_delete(self, project: sdk.Ref.Project, ref: sdk.Ref.Target) -> bool:
        return await self.db.write(resources.target_delete, project, ref)

    # -- box ---------------------------------------------------------------

    async def box_upsert(self, box: vs.Box) -> vs.Box:
        now = Timestamp()
        now.GetCurrentTime()
        return await self.db.write(boxes.box_upsert, box, now)

    async def box_get(self, ref: sdk.Ref.Box) -> vs.Box:
        return await self.db.read(boxes.box_get, ref)

    async def box_find(self, ref: sdk.Ref.Box) -> vs.Box | None:
        return await self.db.read(boxes.box_find, ref)

    async def box_list(self) -> list[sdk.Ref.Box]:
        return await self.db.read(boxes.box_list)

    async def box_delete(self, ref: sdk.Ref.Box) -> bool:
        return await self.db.write(boxes.box_delete, ref)
