"""Log lines a service can afford: rate-limited causes, and one JSON object a line.

Whatever a client can trigger at will (a refused token, an undecodable request)
goes through `limited`: at most one line per cause per `interval` seconds, the
next one saying how many were held back, so no client can flood the log.
"""

from __future__ import annotations

import datetime
import json
import logging
import threading
import time
from collections.abc import Callable, Hashable
from typing import Any

# Attributes every LogRecord has: anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
}


_OVERFLOW = ("too many causes",)


class RateLimitedLog:
    """At most one line per cause per `interval` seconds.

    A cause is any hashable naming what happened (not who did it: a client
    with many addresses must not get many lines). The first occurrence in a
    window is logged; later ones are counted, and the count goes out with the
    first line of the next window (field `suppressed`)."""

    def __init__(
        self,
        interval: float = 5.0,
        max_causes: int = 1024,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval = interval
        self.max_causes = max_causes
        self.clock = clock
        self._windows: dict[Hashable, list[float | int]] = {}  # cause -> [start, suppressed]
        self._lock = threading.Lock()  # store threads may log too

    def log(
        self,
        logger: logging.Logger,
        level: int,
        cause: Hashable,
        msg: str,
        *args: object,
        **fields: Any,
    ) -> bool:
        """Log `msg % args` with `fields` as structured fields, unless this
        cause was logged less than `interval` seconds ago. True if logged."""
        if not logger.isEnabledFor(level):
            return False
        now = self.clock()
        with self._lock:
            if cause not in self._windows and len(self._windows) >= self.max_causes:
                self._forget_expired(now)
                if len(self._windows) >= self.max_causes:
                    cause = _OVERFLOW  # too many distinct causes at once: they share one
            window = self._windows.get(cause)
            if window is not None and now - window[0] < self.interval:
                window[1] += 1
                return False
            suppressed = int(window[1]) if window is not None else 0
            self._windows[cause] = [now, 0]
        if suppressed:
            msg += f" (and {suppressed} more like it since the last such line)"
            fields["suppressed"] = suppressed
        logger.log(level, msg, *args, extra=fields)
        return True

    def _forget_expired(self, now: float) -> None:
        expired = [c for c, (start, _) in self._windows.items() if now - start >= self.interval]
        for cause in expired:
            del self._windows[cause]


# The one limiter of the server process: refused calls, undecodable requests.
limited = RateLimitedLog()


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time (RFC 3339, UTC), level, logger, message, and
    the record's structured fields (those given with `extra=`), when present."""

    def format(self, record: logging.LogRecord) -> str:
        moment = datetime.datetime.fromtimestamp(record.created, datetime.UTC)
        entry: dict[str, Any] = {
            "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RECORD_ATTRIBUTES and not key.startswith("_"):
                entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        if record.stack_info:
            entry["stack"] = self.formatStack(record.stack_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


TEXT_FORMAT = "%(asctime)s %(levelname)-7s %(name)s: %(message)s"
LOG_FORMATS = ("text", "json")


def formatter(log_format: str) -> logging.Formatter:
    if log_format == "json":
        return JsonFormatter()
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    raise ValueError(f"unknown log format {log_format!r}: want one of {', '.join(LOG_FORMATS)}")


class QuietAlembicStart(logging.Filter):
    """Drops the two lines Alembic logs on every start, migrating or not (its
    migrations, "Running upgrade ...", still show)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(("Context impl ", "Will assume "))
