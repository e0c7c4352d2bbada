"""The CLI's waiting displays, in process: what a pipe (not a terminal) gets."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from waystation.cli.watch import PendingClock, waited


def test_a_pending_job_in_a_pipe_gets_a_note_as_the_wait_doubles(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(PendingClock, "FIRST_NOTE", 0.05)
    shown = io.StringIO()
    clock = PendingClock(Console(file=shown, width=200), "job J")
    clock.pending("queued, position 1 of 1")
    deadline = time.monotonic() + 30
    while shown.getvalue().count("\n") < 2:
        assert time.monotonic() < deadline, shown.getvalue()
        time.sleep(0.01)
    clock.stop()
    lines = shown.getvalue().splitlines()
    assert lines[:2] == [
        "job J: still queued, position 1 of 1 after 0s",
        "job J: still queued, position 1 of 1 after 0s",
    ]
    settled = shown.getvalue()
    time.sleep(0.3)  # stopped: no more notes
    assert shown.getvalue() == settled


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.4, "0s"), (59.9, "59s"), (60, "1m00s"), (3599, "59m59s"), (3600, "1h00m"), (7380, "2h03m")],
)
def test_waited(seconds: float, text: str) -> None:
    assert waited(seconds) == text
