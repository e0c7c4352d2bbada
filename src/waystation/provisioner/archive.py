"""Template source archives: plain tar, at most 1 MiB, nothing outside its root.

The server checks an archive when it is pushed; the daemon checks it again
when it unpacks (it may come from an older server, or another one).
"""

from __future__ import annotations

import hashlib
import io
import tarfile
from pathlib import Path, PurePosixPath

from waystation.errors import InvalidArgument

MAX_ARCHIVE_BYTES = 1 << 20  # upstream's limit for template sources


def _members(data: bytes) -> list[tarfile.TarInfo]:
    if len(data) > MAX_ARCHIVE_BYTES:
        raise InvalidArgument(
            f"template archive is {len(data)} bytes; the limit is {MAX_ARCHIVE_BYTES} (1 MiB)"
        )
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
            members = tar.getmembers()
    except tarfile.TarError as exc:
        raise InvalidArgument(f"template archive is not a tar file: {exc}") from None
    return members


def unsafe_reason(member: tarfile.TarInfo) -> str | None:
    path = PurePosixPath(member.name)
    if path.is_absolute() or ".." in path.parts:
        return "leaves the archive's root"
    if not (member.isfile() or member.isdir()):
        return "is not a regular file or directory"
    return None


def check(data: bytes) -> str:
    """Refuse an archive that is too big, not a tar, or reaches outside its root;
    return its sha256 (hex)."""
    for member in _members(data):
        reason = unsafe_reason(member)
        if reason is not None:
            raise InvalidArgument(f"template archive entry {member.name!r} {reason}")
    return hashlib.sha256(data).hexdigest()


def extract(data: bytes, directory: Path) -> list[str]:
    """Unpack regular files and directories into `directory`; entries that
    would leave it (or links, devices) are skipped, as upstream does.
    Returns the names skipped."""
    members = _members(data)
    skipped = []
    safe = []
    for member in members:
        if unsafe_reason(member) is not None:
            skipped.append(member.name)
        else:
            safe.append(member)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tar:
        tar.extractall(directory, members=safe, filter="data")
    return skipped


def pack(directory: Path) -> bytes:
    """Tar a directory's regular files and subdirectories (for `template push`),
    with names relative to it, in a stable order."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:") as tar:
        for path in sorted(directory.rglob("*")):
            relative = path.relative_to(directory).as_posix()
            if any(part.startswith(".") for part in PurePosixPath(relative).parts):
                continue  # .git, .terraform and other hidden state stay home
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                continue
            tar.add(path, arcname=relative, recursive=False)
    return buffer.getvalue()
