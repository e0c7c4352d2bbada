"""Job output: one shared in-memory copy per job, however many watch it.

A job's OutputLog holds its Terminal batches in order. The runner stream that
produces them appends here (watchers see them at once) and an OutputWriter
persists them in batches. Watchers of a job that runs elsewhere (another
replica) or has finished read the persisted rows into the same shared log.
The log lives while anyone holds it (the engine counts references).
"""

from __future__ import annotations

import asyncio
import bisect
import logging
import math
import time

from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store import Store

log = logging.getLogger(__name__)

Terminal = vs.GetJobStreamResponse.Terminal

# How many batches one flush persists at most, and how long a batch may wait.
FLUSH_BATCHES = 256
FLUSH_SECONDS = 0.05
# A watcher behind by several batches gets them in one message, up to this size
# (clients refuse messages over 4 MiB by default).
MERGE_BYTES = 1 << 20


class OutputLog:
    def __init__(self, job_id: str, first_seq: int) -> None:
        self.job_id = job_id
        self.first_seq = first_seq  # seq of batches[0]
        self.batches: list[Terminal] = []
        # Each batch serialized once, however many watchers send it or the
        # writer stores it: the Terminal message with buffered unset, which
        # is exactly its `events` records.
        self._encoded: list[bytes] = []
        # When each batch reached this server (monotonic clock): a watcher that
        # joined later gets it as buffered backlog. Rows already stored when the
        # log is first loaded count as reached at -inf. Never decreasing.
        self.seen_at: list[float] = []
        self.refs = 0
        self.local_writer = False

    @property
    def next_seq(self) -> int:
        return self.first_seq + len(self.batches)

    def append(self, batch: Terminal, seen_at: float | None = None) -> int:
        self.batches.append(batch)
        self.seen_at.append(time.monotonic() if seen_at is None else seen_at)
        return self.next_seq - 1

    def live_from(self, joined: float) -> int:
        """The first seq that reached us at or after `joined` (a watcher's start)."""
        return self.first_seq + bisect.bisect_left(self.seen_at, joined)

    def encoded(self, seq: int) -> bytes:
        index = seq - self.first_seq
        while len(self._encoded) <= index:
            self._encoded.append(self.batches[len(self._encoded)].SerializeToString())
        return self._encoded[index]

    def terminal_response(self, seq: int, buffered: bool, until: int) -> tuple[bytes, int]:
        """A GetJobStreamResponse{terminal} carrying the batches from `seq` on,
        before `until` (as many as fit MERGE_BYTES, at least one), already
        serialized; and the seq after the last one carried. Repeated fields
        concatenate on the wire, so merging batches is joining their encodings."""
        parts = [self.encoded(seq)]
        size = len(parts[0])
        seq += 1
        while seq < min(until, self.next_seq):
            part = self.encoded(seq)
            if size + len(part) > MERGE_BYTES:
                break
            parts.append(part)
            size += len(part)
            seq += 1
        if buffered:
            parts.append(_BUFFERED)
            size += len(_BUFFERED)
        return b"".join((_TERMINAL_TAG, _varint(size), *parts)), seq

    async def refresh(self, store: Store, *, backlog: bool = False) -> None:
        """Pull batches persisted by someone else (another replica, or a past run);
        `backlog`: this is the log's first load, so they were there before anyone
        here watched."""
        if self.local_writer:
            return
        seen_at = -math.inf if backlog else None
        while True:
            rows = await store.output_read(self.job_id, self.next_seq - 1)
            for seq, data in rows:
                if seq == self.next_seq:
                    self.append(Terminal.FromString(data), seen_at)
            if len(rows) < 1000:
                return


class OutputWriter:
    """Persists a local log's batches in the background, in groups."""

    def __init__(self, store: Store, output: OutputLog) -> None:
        self.store = store
        self.output = output
        self.persisted = output.next_seq
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._error: BaseException | None = None

    def notify(self) -> None:
        self._wake.set()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"output-{self.output.job_id}")

    async def _run(self) -> None:
        while self.persisted < self.output.next_seq:
            await asyncio.sleep(FLUSH_SECONDS)  # let a group of batches gather
            await self._flush_once()
        self._task = None

    async def _flush_once(self) -> None:
        start = self.persisted - self.output.first_seq
        pending = self.output.batches[start : start + FLUSH_BATCHES]
        if not pending:
            return
        data = [self.output.encoded(self.persisted + i) for i in range(len(pending))]
        await self.store.output_append(self.output.job_id, self.persisted, data)
        self.persisted += len(data)

    async def flush(self) -> None:
        """Persist everything appended so far (before the job may complete)."""
        task = self._task
        if task is not None:
            await asyncio.shield(task)
        while self.persisted < self.output.next_seq:
            await self._flush_once()


# Wire format of GetJobStreamResponse.terminal (field 3) and Terminal.buffered
# (field 2), pinned by tests against the generated classes.
_TERMINAL_TAG = bytes([3 << 3 | 2])
_BUFFERED = bytes([2 << 3 | 0, 1])


def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)
