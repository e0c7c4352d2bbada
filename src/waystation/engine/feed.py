"""The change feed: wake-ups for whoever follows a job, a topic or the queue.

A publish only says "look again": followers re-read the database, which stays
the source of truth. So a missed or merged wake-up costs latency, never
correctness, and followers also look again every poll interval, which is
what lets them see changes made by other server replicas.
"""

from __future__ import annotations

import asyncio
from collections import defaultdict
from collections.abc import Iterator
from contextlib import contextmanager


class Feed:
    def __init__(self) -> None:
        self._subscribers: defaultdict[str, set[asyncio.Event]] = defaultdict(set)
        self._versions: dict[str, int] = {}

    def publish(self, topic: str) -> None:
        subscribers = self._subscribers.get(topic)
        if subscribers:
            self._versions[topic] = self._versions.get(topic, 0) + 1
            for event in subscribers:
                event.set()

    def version(self, topic: str) -> int:
        """Counts publishes while anyone subscribes: tells which topic moved."""
        return self._versions.get(topic, 0)

    @contextmanager
    def subscribe(self, *topics: str) -> Iterator[asyncio.Event]:
        """An event set whenever any of `topics` is published; clear it yourself."""
        event = asyncio.Event()
        for topic in topics:
            self._subscribers[topic].add(event)
        try:
            yield event
        finally:
            for topic in topics:
                subscribers = self._subscribers.get(topic)
                if subscribers is not None:
                    subscribers.discard(event)
                    if not subscribers:
                        del self._subscribers[topic]
                        self._versions.pop(topic, None)


async def wait(event: asyncio.Event, seconds: float) -> bool:
    """Wait for `event` at most `seconds`; True if it was set."""
    try:
        async with asyncio.timeout(seconds):
            await event.wait()
    except TimeoutError:
        return False
    return True


def job_topic(job_id: str) -> str:
    """A job's state or cancel flag changed."""
    return f"job:{job_id}"


def output_topic(job_id: str) -> str:
    """A job got output."""
    return f"output:{job_id}"


CONFIG_TOPIC = "config"  # runner config variables changed
OUTPUT_TOPIC = "output"  # some job got output (GetLogStream follows this)
