"""Checks on values that come from the network, with precise messages.

Missing required values are FailedPrecondition (upstream's mapping of
validation errors); present but malformed values are InvalidArgument.
"""

from __future__ import annotations

import posixpath
import re

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from waystation.errors import FailedPrecondition, InvalidArgument
from waystation.protocol import vagrant_server_pb2 as vs

MAX_NAME = 255
MAX_PATH = 4096
MAX_ID = 128
# A stored record (its serialized message) may not be larger than this; gRPC
# already refuses requests over 4 MiB.
MAX_RECORD = 1024 * 1024

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def required(kind: str, field: str, value: str) -> str:
    if not value:
        raise FailedPrecondition(f"{kind} {field} is required")
    return value


def name(kind: str, value: str, field: str = "name") -> str:
    required(kind, field, value)
    _bounded(kind, field, value, MAX_NAME)
    if _CONTROL.search(value):
        raise InvalidArgument(f"{kind} {field} contains control characters")
    if value != value.strip():
        raise InvalidArgument(f"{kind} {field} has leading or trailing whitespace")
    return value


def path(kind: str, value: str, field: str = "path") -> str:
    required(kind, field, value)
    _bounded(kind, field, value, MAX_PATH)
    if "\x00" in value:
        raise InvalidArgument(f"{kind} {field} contains a NUL byte")
    return value


def resource_id(kind: str, value: str, field: str = "resource_id") -> str:
    """An id a client sends back to us: bounded, printable, no spaces."""
    _bounded(kind, field, value, MAX_ID)
    if value and (_CONTROL.search(value) or " " in value):
        raise InvalidArgument(f"{kind} {field} contains spaces or control characters")
    return value


def record_size(kind: str, size: int) -> None:
    if size > MAX_RECORD:
        raise InvalidArgument(f"{kind} is too large: {size} bytes, at most {MAX_RECORD}")


def _bounded(kind: str, field: str, value: str, limit: int) -> None:
    if len(value) > limit:
        raise InvalidArgument(
            f"{kind} {field} is too long: {len(value)} characters, at most {limit}"
        )


def no_nul(message: Message, path: str = "") -> None:
    """Refuse a NUL in any string field: it is never meaningful in a name, a key
    or a ref, and PostgreSQL cannot even compare it."""
    for field, value in message.ListFields():
        where = f"{path}{field.name}"
        if field.type == FieldDescriptor.TYPE_STRING:
            values = value if field.is_repeated else [value]
            if any("\x00" in v for v in values):
                raise InvalidArgument(f"{where} contains a NUL byte")
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            if field.message_type is not None and field.message_type.GetOptions().map_entry:
                for key, item in value.items():
                    if "\x00" in str(key) or (isinstance(item, str) and "\x00" in item):
                        raise InvalidArgument(f"{where} contains a NUL byte")
                    if isinstance(item, Message):
                        no_nul(item, f"{where} ")
            elif field.is_repeated:
                for item in value:
                    no_nul(item, f"{where} ")
            else:
                no_nul(value, f"{where} ")


def git_source(git: vs.Job.Git) -> None:
    """A job's git data source: checked when queued, and again by the runner."""
    if not git.url:
        raise FailedPrecondition("job git data source needs a url")
    path("job", git.url, field="git url")
    if git.path:
        normalized = posixpath.normpath(git.path)
        if posixpath.isabs(git.path) or normalized == ".." or normalized.startswith("../"):
            raise InvalidArgument(
                f"job git path must be relative and stay inside the repository: {git.path!r}"
            )
