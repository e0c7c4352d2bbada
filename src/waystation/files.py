"""Files that hold secrets (the database with its signing keys, snapshots of it):
created readable by their owner only, whatever the umask."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

log = logging.getLogger(__name__)

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


def private_dir(path: Path) -> None:
    """Create `path` (and missing parents) with mode 0700; one that exists is left
    as it is (it may be shared on purpose: see warn_if_loose)."""
    if not path.exists():
        path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        os.chmod(path, PRIVATE_DIR)  # mkdir's mode goes through the umask


def warn_if_loose(path: Path) -> None:
    """A warning when other users may enter the directory `path`."""
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return
    if path.is_dir() and mode & 0o077:
        log.warning(
            "%s is accessible to other users (mode %04o): it holds the database and snapshots;"
            " chmod 700 it",
            path,
            mode,
        )


def private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 if it is missing; tighten it to 0600 if it
    exists (our own file, which holds secrets)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, PRIVATE_FILE)
    try:
        if stat.S_IMODE(os.fstat(fd).st_mode) != PRIVATE_FILE:
            os.fchmod(fd, PRIVATE_FILE)
    finally:
        os.close(fd)


def open_private(path: Path) -> int:
    """A new or truncated file of mode 0600 open for writing (a descriptor)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE)
    os.fchmod(fd, PRIVATE_FILE)  # it may have existed with another mode
    return fd
