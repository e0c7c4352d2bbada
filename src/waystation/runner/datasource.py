"""Where a job's files come from: the runner's own directory, or a git checkout."""

from __future__ import annotations

import asyncio
import contextlib
import posixpath
import shutil
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from waystation import validate
from waystation.errors import FailedPrecondition
from waystation.protocol import vagrant_server_pb2 as vs

GIT_TIMEOUT = 300.0


@contextlib.asynccontextmanager
async def checkout(job: vs.Job, data_dir: Path) -> AsyncIterator[Path]:
    """The directory the job works in; a git checkout is removed afterwards."""
    if job.data_source.WhichOneof("source") != "git":
        data_dir.mkdir(parents=True, exist_ok=True)
        yield data_dir
        return
    git = vs.Job.Git()
    git.CopyFrom(job.data_source.git)
    if job.data_source_overrides.get("ref"):
        git.ref = job.data_source_overrides["ref"]
    validate.git_source(git)
    root = Path(tempfile.mkdtemp(prefix="waystation-git-"))
    try:
        await _git("clone", "--quiet", "--no-checkout", "--", git.url, str(root / "repo"))
        await _git("checkout", "--quiet", git.ref or "HEAD", "--", cwd=root / "repo")
        work = root / "repo" / posixpath.normpath(git.path or ".")
        if not work.is_dir():
            raise FailedPrecondition(f"git path {git.path!r} is not a directory in {git.url}")
        yield work
    finally:
        shutil.rmtree(root, ignore_errors=True)


async def _git(*args: str, cwd: Path | None = None) -> None:
    proc = await asyncio.create_subprocess_exec(
        "git",
        *args,
        cwd=cwd,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env={"GIT_TERMINAL_PROMPT": "0", "PATH": "/usr/local/bin:/usr/bin:/bin"},
    )
    try:
        async with asyncio.timeout(GIT_TIMEOUT):
            out, _ = await proc.communicate()
    except TimeoutError:
        proc.kill()
        raise FailedPrecondition(f"git {args[0]} timed out after {GIT_TIMEOUT:.0f}s") from None
    if proc.returncode != 0:
        lines = out.decode(errors="replace").strip().splitlines()
        # git's own reason is its `fatal:`/`error:` line; hints follow it.
        reasons = [ln for ln in lines if ln.startswith(("fatal:", "error:"))]
        detail = (reasons or lines or [f"exit code {proc.returncode}"])[0]
        raise FailedPrecondition(f"git {args[0]} failed: {detail}")
