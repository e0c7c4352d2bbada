"""Rendering a job's event stream for people: spinners, colours, tables."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable

from rich.console import Console
from rich.status import Status
from rich.table import Table
from rich.text import Text

from waystation.protocol import vagrant_server_pb2 as vs

Event = vs.GetJobStreamResponse.Terminal.Event
State = vs.Job.State


class Renderer:
    """Turns GetJobStream responses into terminal output, live."""

    def __init__(self, console: Console, waiting: Status | None = None) -> None:
        self.console = console
        self.spinner = waiting
        self.steps: dict[int, str] = {}

    def render(self, response: vs.GetJobStreamResponse) -> None:
        kind = response.WhichOneof("event")
        if kind == "state":
            self._state(response.state)
        elif kind == "terminal":
            for event in response.terminal.events:
                self._event(event)

    def set_waiting(self, text: str) -> None:
        if self.spinner is not None:
            self.spinner.update(text)

    def close(self) -> None:
        if self.spinner is not None:
            self.spinner.stop()
            self.spinner = None

    def _state(self, state: vs.GetJobStreamResponse.State) -> None:
        if state.current == vs.Job.WAITING:
            self.set_waiting(f"assigned to runner {state.job.assigned_runner.id}")
        elif state.current == vs.Job.RUNNING:
            if state.canceling:
                self.set_waiting("cancelling...")
            elif state.previous != vs.Job.RUNNING:
                self.set_waiting(f"running on {state.job.assigned_runner.id}")

    def _event(self, event: Event) -> None:
        kind = event.WhichOneof("event")
        if kind == "line":
            style = event.line.color or ("bold" if event.line.style == "header" else "")
            self.console.print(Text(event.line.msg, style=style), soft_wrap=True)
        elif kind == "status":
            if event.status.msg:
                self.set_waiting(event.status.msg)
        elif kind == "step":
            self._step(event.step)
        elif kind == "raw":
            stream = sys.stderr.buffer if event.raw.stderr else sys.stdout.buffer
            self.console.file.flush()
            stream.write(event.raw.data)
            stream.flush()
        elif kind == "table":
            self._table(event.table)
        elif kind == "named_values":
            for value in event.named_values.values:
                self.console.print(Text.assemble((value.name, "bold"), ": ", value.value))

    def _step(self, step: Event.Step) -> None:
        if not step.close:
            self.steps[step.id] = step.msg
            self.set_waiting(step.msg)
            return
        opened = self.steps.pop(step.id, "")
        ok = step.status in ("", "success")
        mark = Text("✓ ", style="green") if ok else Text("✗ ", style="red")
        self.console.print(mark + Text(step.msg or opened))
        if step.output:
            self.console.print(Text(step.output.decode(errors="replace")))

    def _table(self, table: Event.Table) -> None:
        rendered = Table(box=None, header_style="bold", pad_edge=False)
        for header in table.headers:
            rendered.add_column(header.upper())
        for row in table.rows:
            rendered.add_row(*(Text(e.value, style=e.color) for e in row.entries))
        self.console.print(rendered)


def exit_code(job: vs.Job) -> int:
    """The job's outcome as a process exit status."""
    if job.state == vs.Job.SUCCESS:
        run = job.result.run
        return run.exit_code if job.result.HasField("run") and run.exit_code else 0
    return 1


def summary(job: vs.Job, started: float) -> Text:
    took = f"{time.monotonic() - started:.1f}s"
    if job.state == vs.Job.SUCCESS and exit_code(job) == 0:
        return Text.assemble(("✓ ", "green"), f"job {job.id} succeeded in {took}")
    if job.state == vs.Job.SUCCESS:
        return Text.assemble(
            ("✗ ", "red"), f"job {job.id}: the command exited with {exit_code(job)} ({took})"
        )
    reason = job.error.message or State.Name(job.state)
    if expired(job):
        reason = "it expired before any runner took it"
    return Text.assemble(("✗ ", "red"), f"job {job.id} failed: {reason} ({took})")


def expired(job: vs.Job) -> bool:
    """Ended by its expiry (cancelled at or after expire_time, never acked)."""
    return (
        job.state == vs.Job.ERROR
        and job.HasField("expire_time")
        and not job.HasField("ack_time")
        and job.cancel_time.ToMicroseconds() >= job.expire_time.ToMicroseconds()
    )


def describe(job: vs.Job) -> str:
    operation = job.WhichOneof("operation") or "?"
    if operation == "command":
        return " ".join([job.command.command, *job.command.cli_args.args])
    return operation


def scope_name(job: vs.Job) -> str:
    kind = job.WhichOneof("scope")
    if kind is None:
        return ""
    ref = getattr(job, kind)
    return f"{kind} {ref.name or ref.resource_id}"


def rows(jobs: Iterable[vs.Job]) -> list[list[str]]:
    return [
        [
            j.id,
            State.Name(j.state),
            describe(j),
            scope_name(j),
            j.assigned_runner.id,
            j.queue_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
            if j.HasField("queue_time")
            else "",
        ]
        for j in jobs
    ]
