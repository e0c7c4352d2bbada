"""Output sent to watchers is encoded once per batch and merged on the wire
(engine.output): the bytes must decode to the message the generated classes
would have built."""

from __future__ import annotations

import pytest

from waystation.engine import output as output_module
from waystation.engine.output import OutputLog, Terminal
from waystation.protocol import vagrant_server_pb2 as vs

Response = vs.GetJobStreamResponse


def batch(*lines: str) -> Terminal:
    return Terminal(events=[Terminal.Event(line=Terminal.Event.Line(msg=m)) for m in lines])


def lines(response: Response) -> list[str]:
    return [e.line.msg for e in response.terminal.events]


@pytest.mark.parametrize("buffered", [False, True])
def test_merged_batches_decode_as_one_terminal_message(buffered: bool) -> None:
    log = OutputLog("j", first_seq=5)
    log.append(batch("a", "b"))
    log.append(batch("c"))
    log.append(batch("d" * 300))  # a length that needs a two-byte varint
    encoded, after = log.terminal_response(5, buffered, until=8)
    assert after == 8
    decoded = Response.FromString(encoded)
    assert decoded.WhichOneof("event") == "terminal"
    assert decoded.terminal.buffered is buffered
    assert lines(decoded) == ["a", "b", "c", "d" * 300]
    expected = Response(terminal=Terminal(events=[*(e for b in log.batches for e in b.events)]))
    expected.terminal.buffered = buffered
    assert decoded == expected


def test_merging_stops_at_the_size_cap_but_always_sends_one(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(output_module, "MERGE_BYTES", 60)  # two 26-byte batches
    log = OutputLog("j", first_seq=0)
    for i in range(4):
        log.append(batch(f"{i}" * 20))
    log.append(batch("x" * 200))  # alone over the cap
    sent, seq = [], 0
    while seq < log.next_seq:
        encoded, seq = log.terminal_response(seq, False, until=log.next_seq)
        sent.append(lines(Response.FromString(encoded)))
    assert sent == [["0" * 20, "1" * 20], ["2" * 20, "3" * 20], ["x" * 200]]


def test_a_batch_is_stored_as_its_terminal_encoding() -> None:
    log = OutputLog("j", first_seq=0)
    log.append(batch("a"))
    assert Terminal.FromString(log.encoded(0)) == log.batches[0]


def test_batches_that_reached_us_before_a_watcher_joined_are_its_backlog() -> None:
    log = OutputLog("j", first_seq=0)
    log.append(batch("stored"), seen_at=float("-inf"))  # loaded from the store
    log.append(batch("early"), seen_at=10.0)
    log.append(batch("late"), seen_at=20.0)
    assert [log.live_from(t) for t in (5.0, 10.0, 15.0, 25.0)] == [1, 1, 2, 3]
    # Backlog and live lines never share a message.
    encoded, after = log.terminal_response(0, True, until=log.live_from(15.0))
    assert (lines(Response.FromString(encoded)), after) == (["stored", "early"], 2)
