"""GetLogStream: job output of a scope, flattened to lines for LogBatch."""

from __future__ import annotations

from waystation.core.timeouts import now_us
from waystation.errors import Unavailable
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.store import Store
from waystation.store.output import ScopeRef

Event = vs.GetJobStreamResponse.Terminal.Event
# How far back (microseconds) a poll looks for jobs that just finished.
_MARGIN = 60_000_000


def lines(event: Event) -> list[str]:
    """The text lines one terminal event shows."""
    kind = event.WhichOneof("event")
    if kind == "line":
        return [event.line.msg]
    if kind == "status":
        return [event.status.msg] if event.status.msg else []
    if kind == "step":
        text = event.step.msg
        if event.step.output:
            text += "\n" + event.step.output.decode(errors="replace")
        return text.splitlines()
    if kind == "raw":
        return event.raw.data.decode(errors="replace").splitlines()
    if kind == "named_values":
        return [f"{v.name}: {v.value}" for v in event.named_values.values]
    if kind == "table":
        rows = ["\t".join(event.table.headers)]
        rows += ["\t".join(e.value for e in row.entries) for row in event.table.rows]
        return rows
    return []


class ScopeLog:
    """Follows the output of every job on a basis, project or target."""

    def __init__(self, store: Store, kind: str, ref: ScopeRef) -> None:
        self.store = store
        self.kind = kind
        self.ref = ref
        self.cursor: dict[str, int] = {}
        self.checked = 0

    async def _read(self, since: int | None) -> list[vs.LogBatch]:
        started = now_us()
        rows = await self.store.output_for_scope(self.kind, self.ref, dict(self.cursor), since)
        self.checked = started
        batches: dict[str, vs.LogBatch] = {}
        for job_id, seq, data in rows:
            self.cursor[job_id] = seq
            batch = batches.setdefault(job_id, vs.LogBatch(deployment_id=job_id))
            for event in vs.GetJobStreamResponse.Terminal.FromString(data).events:
                for text in lines(event):
                    batch.lines.add(timestamp=event.timestamp, line=text)
        return [b for b in batches.values() if b.lines]

    async def backlog(self, limit: int | None) -> list[vs.LogBatch]:
        """The newest `limit` lines (all with None); an error when there are none."""
        batches = await self._read(None)
        if not batches:
            raise Unavailable(f"no log lines yet for this {self.kind}; try again later")
        if limit is None:
            return batches
        kept: list[vs.LogBatch] = []
        remaining = limit
        for batch in reversed(batches):
            if remaining <= 0:
                break
            tail = list(batch.lines)[-remaining:]
            remaining -= len(tail)
            kept.append(vs.LogBatch(deployment_id=batch.deployment_id, lines=tail))
        return list(reversed(kept))

    async def new_lines(self) -> list[vs.LogBatch]:
        return await self._read(self.checked - _MARGIN)
