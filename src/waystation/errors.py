"""The one exception tree of waystation.

The engine and the store raise these; the gRPC edge (`waystation.server.errors`)
turns each into a status code. Messages are safe to show to clients: internal
detail goes to the server log, never into a WaystationError.
"""

from __future__ import annotations


class WaystationError(Exception):
    """Root of every error waystation raises on purpose."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class NotFound(WaystationError):
    """The named record does not exist."""


class FailedPrecondition(WaystationError):
    """A required field is missing, a parent does not exist, or the state forbids it."""


class InvalidArgument(WaystationError):
    """A value is malformed: too long, bad characters, unparsable."""


class AlreadyExists(WaystationError):
    """A unique name, path or key is taken by another record."""


class PermissionDenied(WaystationError):
    """The caller is known but may not do this."""


class Unauthenticated(WaystationError):
    """The caller did not prove who it is."""


class Unavailable(WaystationError):
    """Not now: the client may retry later."""
