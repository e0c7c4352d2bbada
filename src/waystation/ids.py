"""Identifiers the server makes."""

from __future__ import annotations

import uuid

from ulid import ULID


def new_id() -> str:
    """A ULID in uppercase Crockford base32: sortable by creation time."""
    return str(ULID())


def new_uuid() -> str:
    return str(uuid.uuid4())
