"""Verbs of snapshots: the whole store to a file and back."""

from __future__ import annotations

from pathlib import Path
from typing import IO

from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store import snapshot
from waystation.store.verbs.base import Pending, Verbs


class SnapshotVerbs(Verbs):
    def snapshot_write(self, out: IO[bytes], version: vs.VersionInfo) -> Pending[None]:
        """The whole store, in one read transaction, to `out`."""
        return self._db.read_bulk(snapshot.write, out, version)

    def snapshot_verify(self, path: Path) -> Pending[int]:
        """Check a snapshot file in full (InvalidArgument); its row count."""
        return self._db.read_bulk(snapshot.verify_file, path)

    def snapshot_apply_staged(self, data_dir: Path) -> None:
        """At start, blocking: a staged restore replaces the whole store, once."""
        snapshot.apply_staged(self._db, data_dir)
