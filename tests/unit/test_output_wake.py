"""Watchers of a job that writes fast are woken at most every
OUTPUT_WAKE_SECONDS (engine.OutputAppender): a lone batch wakes them at once,
batches that follow it closely share one later wake-up, and the job's end
wakes them without waiting."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

from waystation.engine.engine import OutputAppender
from waystation.engine.feed import Feed, output_topic
from waystation.engine.output import OutputLog, Terminal


async def _flushed() -> None:
    return None


def appender(feed: Feed) -> OutputAppender:
    engine = cast(Any, SimpleNamespace(feed=feed))
    writer = cast(Any, SimpleNamespace(notify=lambda: None, flush=_flushed))
    return OutputAppender(engine, OutputLog("j", 0), writer)


def batch() -> Terminal:
    return Terminal(events=[Terminal.Event(line=Terminal.Event.Line(msg="x"))])


async def test_a_lone_batch_wakes_at_once_and_a_burst_shares_one_wake_up() -> None:
    feed = Feed()
    topic = output_topic("j")
    output = appender(feed)
    with feed.subscribe(topic) as woken:
        output.append(batch())
        assert feed.version(topic) == 1  # no waiting for the first
        woken.clear()
        output.append(batch())
        output.append(batch())
        assert feed.version(topic) == 1  # the burst waits for its wake-up...
        await asyncio.wait_for(woken.wait(), 10)
        assert feed.version(topic) == 2  # ...and gets one for both batches
        assert output.output.next_seq == 3


async def test_the_end_of_the_output_wakes_watchers_without_waiting() -> None:
    feed = Feed()
    topic = output_topic("j")
    output = appender(feed)
    with feed.subscribe(topic):
        output.append(batch())
        output.append(batch())
        assert feed.version(topic) == 1
        await output.flush()
        assert feed.version(topic) == 2
        await asyncio.sleep(0.1)  # the cancelled wake-up does not fire later
        assert feed.version(topic) == 2
