"""Reading a Vagrantfile in the formats a Python runner can parse: JSON and HCL."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hcl2

from waystation.errors import FailedPrecondition, InvalidArgument
from waystation.protocol import vagrant_server_pb2 as vs

Format = vs.Vagrantfile.Format
# File names a data source may hold, in the order they are looked for.
FILE_NAMES = {"Vagrantfile.json": vs.Vagrantfile.JSON, "Vagrantfile.hcl": vs.Vagrantfile.HCL}


def parse(raw: bytes, fmt: int, source: str = "Vagrantfile") -> dict[str, Any]:
    """The configuration as a dict, or InvalidArgument saying where it is wrong."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidArgument(f"{source}: not UTF-8 (byte {exc.start})") from None
    if fmt == vs.Vagrantfile.JSON:
        try:
            value = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidArgument(
                f"{source}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
            ) from None
        if not isinstance(value, dict):
            raise InvalidArgument(f"{source}: the top level must be an object")
        return value
    if fmt == vs.Vagrantfile.HCL:
        try:
            parsed: dict[str, Any] = hcl2.loads(text)
        except Exception as exc:  # lark raises several kinds; all mean bad syntax
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise InvalidArgument(f"{source}: invalid HCL: {first}") from None
        return parsed
    if fmt == vs.Vagrantfile.RUBY:
        raise FailedPrecondition(f"{source}: Ruby Vagrantfiles need Vagrant's Ruby runtime")
    raise InvalidArgument(f"{source}: unknown Vagrantfile format {fmt}")


def find(job: vs.Job, work_dir: Path) -> tuple[bytes, int, str] | None:
    """The job's Vagrantfile: carried by a command op, else a file in the work dir."""
    if job.WhichOneof("operation") == "command" and job.command.vagrantfile.raw:
        vf = job.command.vagrantfile
        return vf.raw, vf.format, vf.path.path or "Vagrantfile"
    for name, fmt in FILE_NAMES.items():
        path = work_dir / name
        if path.is_file():
            return path.read_bytes(), fmt, name
    return None
