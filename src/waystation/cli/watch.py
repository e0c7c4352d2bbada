"""Rendering a job's event stream for people: spinners, colours, tables."""

from __future__ import annotations

import codecs
import sys
import threading
import time
from collections.abc import Iterable

from rich.console import Console, RenderableType
from rich.live import Live
from rich.spinner import Spinner
from rich.table import Table
from rich.text import Text

from waystation.protocol import vagrant_server_pb2 as vs

Event = vs.GetJobStreamResponse.Terminal.Event
State = vs.Job.State


class Waiting:
    """A spinner line on a terminal (`console`, stderr) that output goes above, never into.

    Rich's own Status redirects sys.stdout into its console even when stdout is a
    pipe, and raw writes to sys.stdout.buffer bypass it and land on the spinner's
    line; so nothing is redirected here and callers print through `print`.
    """

    def __init__(self, console: Console, text: str, clock: bool = False) -> None:
        self.console = console
        self.text = text
        self.clock = clock  # show how long it has waited
        self.since = time.monotonic()
        self._spinner = Spinner("dots", style="status.spinner")
        self._live = Live(
            console=console,
            get_renderable=self._render,
            refresh_per_second=12.5,
            transient=True,
            redirect_stdout=False,
            redirect_stderr=False,
        )

    def _render(self) -> RenderableType:
        text = self.text
        if self.clock:  # first: a long text is cut at the terminal's edge
            text = f"waited {waited(time.monotonic() - self.since)}: {text}"
        self._spinner.update(text=text)
        return self._spinner

    def start(self) -> None:
        self._live.start()

    def update(self, text: str, restart_clock: bool = False) -> None:
        self.text = text
        if restart_clock:
            self.since = time.monotonic()

    def print(self, *renderables: RenderableType) -> None:
        """Print above the spinner."""
        self.console.print(*renderables, soft_wrap=True)

    def stop(self) -> None:
        self._live.stop()


class PendingClock:
    """While a job is pending, how long it has waited: on a terminal a spinner with a
    clock; elsewhere a line now and then (after 30 s, then whenever the wait doubles)."""

    FIRST_NOTE = 30.0

    def __init__(self, console: Console, label: str) -> None:
        self.console = console
        self.label = label
        self.reason = ""
        self._spinner: Waiting | None = None
        self._stopped: threading.Event | None = None
        self._lock = threading.Lock()

    def pending(self, reason: str) -> None:
        with self._lock:
            self.reason = reason
            if self._spinner is not None:
                self._spinner.update(reason)
            elif self._stopped is not None:
                pass  # the notes thread reads self.reason
            elif self.console.is_terminal:
                self._spinner = Waiting(self.console, reason, clock=True)
                self._spinner.start()
            else:
                self._stopped = threading.Event()
                threading.Thread(
                    target=self._notes, args=(self._stopped, time.monotonic()), daemon=True
                ).start()

    def stop(self) -> None:
        with self._lock:
            if self._spinner is not None:
                self._spinner.stop()
                self._spinner = None
            if self._stopped is not None:
                self._stopped.set()
                self._stopped = None

    def _notes(self, stopped: threading.Event, since: float) -> None:
        due = self.FIRST_NOTE
        while not stopped.wait(max(0.0, since + due - time.monotonic())):
            with self._lock:
                if not stopped.is_set():
                    self.console.print(
                        Text(f"{self.label}: still {self.reason} after {waited(due)}", "dim")
                    )
            due *= 2


def waited(seconds: float) -> str:
    """`42s`, `3m05s`, `1h02m`: how long something has waited."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole % 3600 // 60:02d}m"


class Renderer:
    """Turns GetJobStream responses into terminal output, live.

    While a spinner shows on the terminal that stdout also goes to, output is
    printed above it (through its console) rather than written into its line.
    """

    def __init__(self, console: Console, waiting: Waiting | None = None) -> None:
        self.console = console
        self.spinner = waiting
        self.steps: dict[int, str] = {}
        self._decoders = {
            False: codecs.getincrementaldecoder("utf-8")("replace"),
            True: codecs.getincrementaldecoder("utf-8")("replace"),
        }
        self._partial = {False: "", True: ""}  # raw output's unfinished line, per stream

    def _above(self) -> Waiting | None:
        """The spinner to print above, if one shares the screen with our output."""
        if self.spinner is not None and self.console.is_terminal:
            return self.spinner
        return None

    def _print(self, renderable: RenderableType) -> None:
        above = self._above()
        if above is not None:
            above.print(renderable)
        else:
            self.console.print(renderable, soft_wrap=True)

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
            self._flush_raw()
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
            self._print(Text(event.line.msg, style=style))
        elif kind == "status":
            if event.status.msg:
                self.set_waiting(event.status.msg)
        elif kind == "step":
            self._step(event.step)
        elif kind == "raw":
            self._raw(event.raw.data, event.raw.stderr)
        elif kind == "table":
            self._table(event.table)
        elif kind == "named_values":
            for value in event.named_values.values:
                self._print(Text.assemble((value.name, "bold"), ": ", value.value))

    def _raw(self, data: bytes, stderr: bool) -> None:
        if self._above() is None:
            stream = sys.stderr.buffer if stderr else sys.stdout.buffer
            self.console.file.flush()
            stream.write(data)
            stream.flush()
            return
        # Above the spinner only whole lines can go; the rest waits for its end.
        text = self._partial[stderr] + self._decoders[stderr].decode(data)
        *lines, self._partial[stderr] = text.split("\n")
        for line in lines:
            self._print(Text.from_ansi(line))

    def _flush_raw(self) -> None:
        for stderr, rest in self._partial.items():
            rest += self._decoders[stderr].decode(b"", final=True)
            if rest:
                self._print(Text.from_ansi(rest))
            self._partial[stderr] = ""

    def _step(self, step: Event.Step) -> None:
        if not step.close:
            self.steps[step.id] = step.msg
            self.set_waiting(step.msg)
            return
        opened = self.steps.pop(step.id, "")
        ok = step.status in ("", "success")
        mark = Text("✓ ", style="green") if ok else Text("✗ ", style="red")
        self._print(mark + Text(step.msg or opened))
        if step.output:
            self._print(Text(step.output.decode(errors="replace")))

    def _table(self, table: Event.Table) -> None:
        rendered = Table(box=None, header_style="bold", pad_edge=False)
        for header in table.headers:
            rendered.add_column(header.upper())
        for row in table.rows:
            rendered.add_row(*(Text(e.value, style=e.color) for e in row.entries))
        self._print(rendered)


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


def state_text(job: vs.Job) -> str:
    """The state as listed: a command that exited non-zero shows as `exit N`, not SUCCESS."""
    code = exit_code(job)
    if job.state == vs.Job.SUCCESS and code:
        return f"exit {code}"
    return State.Name(job.state)


def rows(jobs: Iterable[vs.Job]) -> list[list[str]]:
    return [
        [
            j.id,
            state_text(j),
            describe(j),
            scope_name(j),
            j.assigned_runner.id,
            j.queue_time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
            if j.HasField("queue_time")
            else "",
        ]
        for j in jobs
    ]
