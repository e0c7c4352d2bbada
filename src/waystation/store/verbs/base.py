"""What every verb mixin shares: the private database they run transactions on."""

from __future__ import annotations

from collections.abc import Coroutine
from typing import Any, TypeAlias, TypeVar

from waystation.store.database import Database

T = TypeVar("T")

# What a verb returns: the transaction's result once awaited.
Pending: TypeAlias = Coroutine[Any, Any, T]


class Verbs:
    _db: Database
