"""Transitional: the metadata keys moved to waystation.core.wire; kept only
while files under concurrent edit still import it."""

from __future__ import annotations

from waystation.core.wire import RESUME_EVENTS as RESUME_EVENTS
from waystation.core.wire import RESUME_JOB as RESUME_JOB
