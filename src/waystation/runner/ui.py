"""What a running job writes to its output: lines, status, steps, tables, raw.

Events are gathered and sent as Terminal batches: when 64 are waiting or
100 ms after the first, so chatty commands cost few messages.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence

from google.protobuf.timestamp_pb2 import Timestamp

from waystation.protocol import vagrant_server_pb2 as vs

Terminal = vs.GetJobStreamResponse.Terminal
Event = Terminal.Event

BATCH_EVENTS = 64
BATCH_SECONDS = 0.1


class UI:
    def __init__(self, send: Callable[[Terminal], Awaitable[None]]) -> None:
        self._send = send
        self._pending: list[Event] = []
        self._timer: asyncio.TimerHandle | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._steps = 0
        self._lock = asyncio.Lock()  # one write at a time on the stream, in order

    # -- what commands call ------------------------------------------------

    def line(self, msg: str, *, style: str = "", color: str = "") -> None:
        self._add(Event(line=Event.Line(msg=msg, style=style, color=color)))

    def status(self, msg: str, *, status: str = "", step: bool = False) -> None:
        self._add(Event(status=Event.Status(msg=msg, status=status, step=step)))

    def step(self, msg: str) -> int:
        """Open a step (shown with a spinner until closed); returns its id."""
        self._steps += 1
        self._add(Event(step=Event.Step(id=self._steps, msg=msg)))
        return self._steps

    def step_done(self, step_id: int, msg: str = "", status: str = "success") -> None:
        self._add(Event(step=Event.Step(id=step_id, close=True, msg=msg, status=status)))

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[str]]) -> None:
        table = Event.Table(headers=list(headers))
        for row in rows:
            table.rows.add(entries=[Event.TableEntry(value=v) for v in row])
        self._add(Event(table=table))

    def named_values(self, values: Sequence[tuple[str, str]]) -> None:
        pairs = [Event.NamedValue(name=n, value=v) for n, v in values]
        self._add(Event(named_values=Event.NamedValues(values=pairs)))

    def raw(self, data: bytes, *, stderr: bool = False) -> None:
        self._add(Event(raw=Event.Raw(data=data, stderr=stderr)))

    # -- batching ----------------------------------------------------------

    def _add(self, event: Event) -> None:
        stamp = Timestamp()
        stamp.GetCurrentTime()
        event.timestamp.CopyFrom(stamp)
        self._pending.append(event)
        if len(self._pending) >= BATCH_EVENTS:
            self._schedule(0)
        elif self._timer is None:
            self._schedule(BATCH_SECONDS)

    def _schedule(self, delay: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(delay, self._start_flush)

    def _start_flush(self) -> None:
        self._timer = None
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.ensure_future(self.flush())

    async def flush(self) -> None:
        """Send everything written so far (always before the job's result)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        async with self._lock:
            while self._pending:
                batch, self._pending = self._pending, []
                await self._send(Terminal(events=batch))
