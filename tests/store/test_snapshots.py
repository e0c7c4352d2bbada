"""Conformance of the snapshot verbs (store/verbs/snapshots.py): a snapshot
written by one store, staged, replaces a second store's data at its start."""

from __future__ import annotations

import asyncio
from pathlib import Path

from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store import Store
from waystation.store.snapshot import staged

from .conftest import Reopen, noop_job, now_us


async def test_a_staged_snapshot_replaces_the_store_at_start(
    store: Store, reopen: Reopen, tmp_path: Path
) -> None:
    job_id = await store.job_queue(noop_job(), now_us(), None)
    path = tmp_path / "backup.snapshot"
    with path.open("wb") as out:
        await store.snapshot_write(out, vs.VersionInfo(version="test"))
    assert await store.snapshot_verify(path) > 0
    await store.job_cancel(job_id, now_us())  # after the snapshot: undone by the restore
    path.replace(staged(tmp_path))

    store = await reopen()
    await asyncio.to_thread(store.snapshot_apply_staged, tmp_path)
    assert (await store.job_get(job_id)).state == vs.Job.QUEUED
    assert not staged(tmp_path).exists()
