"""Files that hold secrets are private whatever the umask: the data directory
0700, the SQLite database and its -wal and -shm files 0600, snapshot files
0600 (the CLI's output, the staged restore, the applied one)."""

from __future__ import annotations

import logging
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from waystation import testing as t
from waystation.core.settings import ServerSettings
from waystation.server.app import start


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def waystation(*args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYSTATION_")}
    return subprocess.run(
        [sys.executable, "-m", "waystation.cli.main", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_the_data_dir_and_the_database_files_are_private(tmp_path: Path) -> None:
    data = tmp_path / "data"
    with umask(0):
        running = await start(ServerSettings(listen="127.0.0.1:0", data_dir=data))
        try:
            await running.store._db.write(lambda conn: None)  # the WAL exists once written
            files = {p.name: mode(p) for p in data.iterdir()}  # SQLite removes -wal at close
        finally:
            await running.stop(1)
    assert mode(data) == 0o700
    names = {"waystation.db", "waystation.db-wal", "waystation.db-shm"}
    assert files == dict.fromkeys(names, 0o600)


async def test_an_older_looser_database_is_tightened_and_a_shared_data_dir_warned_of(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = tmp_path / "data"
    settings = ServerSettings(listen="127.0.0.1:0", data_dir=data)
    running = await start(settings)
    await running.stop(1)
    data.chmod(0o755)
    loosened = [p for p in data.iterdir() if p.name.startswith("waystation.db")]
    for path in loosened:  # as an older version left them
        path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        running = await start(settings)
        await running.stop(1)
    assert {p.name: mode(p) for p in loosened} == {p.name: 0o600 for p in loosened}
    assert mode(data) == 0o755  # left as it is, perhaps shared on purpose, but said so
    assert any("accessible to other users (mode 0755)" in r.getMessage() for r in caplog.records)


def test_snapshot_files_are_private(tmp_path: Path) -> None:
    with umask(0):
        server = t.ServerProcess(tmp_path / "data")
        server.start()
        try:
            path = tmp_path / "backup.snapshot"
            made = waystation("--address", server.address, "snapshot", "create", str(path))
            assert made.returncode == 0, t.show(made)
            assert mode(path) == 0o600
            staged = waystation("--address", server.address, "snapshot", "restore", str(path))
            assert staged.returncode == 0, t.show(staged)
            assert mode(tmp_path / "data" / "restore.snapshot") == 0o600
        finally:
            assert server.stop() == 0
        server.start()  # applies it
        assert server.stop() == 0
    assert mode(tmp_path / "data" / "restore.snapshot.applied") == 0o600
