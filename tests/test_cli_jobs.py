"""`waystation job ...`, `waystation run ...` and `waystation runner ...` as people run them.

Every test runs `python -m waystation.cli.main ...` as a child process against
`waystation server run`, also a child process; where a job must run, a real
`waystation runner --id r1` process takes it. One SQLite server serves the
whole module and the tests run in file order: the newcomer's journey comes
first (on a server that has never seen a project), then the runner is
stopped and the rest look at jobs no runner takes. Each CLI run costs most of
a second, so set-up and checks that are not under test go over gRPC directly.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from google.protobuf.empty_pb2 import Empty

from waystation import testing as t
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.waystation.v1 import admin_pb2 as admin
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc
from waystation.testing import assert_cli_error, cli_table, show

RUNNER = "r1"
QUEUED_RE = re.compile(r"queued job (\w+)")
JOB_ID_RE = re.compile(r"^[0-9A-Z]{26}$")  # a ULID

# -- harness ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def address(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One `waystation server run` on SQLite for the whole module."""
    server = t.ServerProcess(tmp_path_factory.mktemp("cli-jobs") / "data")
    try:
        yield server.start()
    finally:
        if server.proc is not None and server.proc.poll() is None:
            assert server.stop() == 0, server.output()


def _env(address: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYSTATION_")}
    for noise in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "LINES", "NO_COLOR"):
        env.pop(noise, None)
    env["WAYSTATION_ADDR"] = address
    env["COLUMNS"] = "80"
    return env


def _argv(command: str, *extra: str) -> list[str]:
    return [sys.executable, "-m", "waystation.cli.main", *shlex.split(command), *extra]


def cli(address: str, command: str, *extra: str) -> subprocess.CompletedProcess[str]:
    """Run `waystation COMMAND EXTRA...` with WAYSTATION_ADDR=address; never raises on exit."""
    return subprocess.run(
        _argv(command, *extra),
        env=_env(address),
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


@functools.cache
def cli_once(address: str, command: str) -> subprocess.CompletedProcess[str]:
    """`cli`, run once per module server: for a passing test and an xfail on one output."""
    return cli(address, command)


def ran(
    address: str, command: str, *extra: str, status: int = 0
) -> subprocess.CompletedProcess[str]:
    """Run a command that must exit with `status` and print no traceback."""
    result = cli(address, command, *extra)
    assert result.returncode == status, show(result)
    assert "Traceback" not in result.stderr + result.stdout, show(result)
    return result


def ok(address: str, command: str, *extra: str) -> str:
    return ran(address, command, *extra).stdout


def ok_json(address: str, command: str, *extra: str) -> Any:
    return json.loads(ok(address, command, *extra, "--json"))


def queued_id(result: subprocess.CompletedProcess[str]) -> str:
    """The job id `waystation run` reports on stderr."""
    found = QUEUED_RE.search(result.stderr)
    assert found, show(result)
    return found.group(1)


def row_of(stdout: str, first: str) -> list[str]:
    """The table row whose first cell is `first`."""
    found = [row for row in cli_table(stdout)[1] if row and row[0] == first]
    assert len(found) == 1, f"{first!r} not once in:\n{stdout}"
    return found[0]


class Direct:
    """The same server over gRPC, to set up and check what a test is not about."""

    def __init__(self, channel: grpc.Channel) -> None:
        self.vagrant = vs_grpc.VagrantStub(channel)
        self.admin = admin_grpc.AdminStub(channel)

    def job(self, job_id: str) -> vs.Job:
        return self.vagrant.GetJob(vs.GetJobRequest(job_id=job_id), timeout=10)

    def jobs(self) -> list[vs.Job]:
        return list(self.vagrant._ListJobs(vs.ListJobsRequest(), timeout=10).jobs)

    def wait_job(self, job_id: str, state: int, timeout: float = 30) -> vs.Job:
        deadline = time.monotonic() + timeout
        while (job := self.job(job_id)).state != state:
            assert time.monotonic() < deadline, f"job stuck in {vs.Job.State.Name(job.state)}"
            time.sleep(0.05)
        return job

    def runner_online(self, runner_id: str) -> bool:
        found = self.admin.ListRunners(admin.ListRunnersRequest(), timeout=10).runners
        return any(r.runner.id == runner_id and r.online for r in found)

    def target(self, resource_id: str) -> vs.Target:
        request = vs.FindTargetRequest(target=vs.Target(resource_id=resource_id))
        return self.vagrant.FindTarget(request, timeout=10).target


@pytest.fixture(scope="module")
def direct(address: str) -> Iterator[Direct]:
    with grpc.insecure_channel(address) as channel:
        yield Direct(channel)


class RunnerProcess:
    """`waystation runner --id r1 --data-dir ...` as a child process."""

    def __init__(self, address: str, data_dir: Path) -> None:
        self.address = address
        self.data_dir = data_dir
        self.log = data_dir.parent / "runner.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, direct: Direct, timeout: float = 30) -> None:
        argv = _argv(f"runner --id {RUNNER} --data-dir", str(self.data_dir))
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                argv, env=_env(self.address), stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + timeout
        while not direct.runner_online(RUNNER):
            assert self.proc.poll() is None, f"the runner exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"the runner never came online:\n{self.output()}"
            time.sleep(0.05)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, timeout: float = 30) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


@pytest.fixture(scope="module")
def runner(
    address: str, direct: Direct, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunnerProcess]:
    """One runner for the module; a test may stop it (the later ones want none)."""
    process = RunnerProcess(address, tmp_path_factory.mktemp("runner") / "data")
    process.start(direct)
    try:
        yield process
    finally:
        if process.running:
            assert process.stop() == 0, process.output()


@pytest.fixture(scope="module")
def no_runner(runner: RunnerProcess, direct: Direct) -> None:
    """From here on, no runner is connected: jobs stay queued until cancelled or expired."""
    if runner.running:
        assert runner.stop() == 0, runner.output()
    assert not direct.runner_online(RUNNER)


# -- the newcomer's journey --------------------------------------------------------


def test_newcomer_runs_up_status_exec_and_destroy_on_a_fresh_server(
    address: str, direct: Direct, runner: RunnerProcess
) -> None:
    assert not direct.vagrant.ListProjects(Empty(), timeout=10).projects, "not a fresh server"

    up = ran(address, "run up --target web")
    assert "booted and ready" in up.stdout, show(up)
    assert "created target web in project default" in up.stderr, show(up)
    assert f"job {queued_id(up)} succeeded" in up.stderr, show(up)

    web = ok_json(address, "target get web")
    assert (web["name"], web["state"]) == ("web", "CREATED")
    assert web["project"]["name"] == "default"
    assert web["project"]["basis"]["name"] == "default"

    status = ran(address, "run status --target web")
    header, rows = cli_table(status.stdout)
    assert header == ["NAME", "STATE", "PROVIDER", "PID"], show(status)
    assert rows[0][:3] == ["web", "running", "local"], show(status)

    # One shell line after `--`: its output streams back, its status is ours.
    failed = ran(address, "run exec --target web --", "echo hi; exit 3", status=3)
    assert failed.stdout.splitlines() == ["hi"], show(failed)
    assert "the command exited with 3" in failed.stderr, show(failed)

    # Watching a finished job replays its output and exits with its status again.
    again = ran(address, f"job watch {queued_id(failed)}", status=3)
    assert again.stdout.splitlines() == ["hi"], show(again)

    # Listed, it shows as what it was: a command that exited 3, not a plain SUCCESS.
    listed = [line for line in ok(address, "job list").splitlines() if queued_id(failed) in line]
    assert len(listed) == 1 and " exit 3 " in listed[0], listed
    got = ok(address, f"job get {queued_id(failed)}").splitlines()
    assert " exit 3 " in got[1], got

    destroy = ran(address, "run destroy --target web")
    assert "destroyed" in destroy.stdout, show(destroy)
    assert direct.target(web["resource_id"]).state == vs.Operation.DESTROYED


# -- jobs, with a runner -------------------------------------------------------------


def on_a_terminal(address: str, command: str, *extra: str) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on one pseudo-terminal: its exit status and
    what the screen was sent, escape sequences removed."""
    primary, secondary = os.openpty()
    shown = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed its side
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    try:
        with subprocess.Popen(
            _argv(command, *extra), env=_env(address), stdout=secondary, stderr=secondary
        ) as proc:
            os.close(secondary)
            secondary = -1
            reader.start()
            status = proc.wait(timeout=60)
        reader.join(10)
    finally:
        if secondary != -1:
            os.close(secondary)
        os.close(primary)
    return status, re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))


def test_run_on_a_terminal_prints_output_above_the_spinner_never_into_it(
    address: str, runner: RunnerProcess
) -> None:
    script = "for i in 1 2 3; do echo tick $i; sleep 0.3; done"
    status, screen = on_a_terminal(address, "run exec --target web --", script)
    assert status == 0, screen
    # Each redraw starts at the line's beginning (\r); output gets lines of its own.
    pieces = [p for p in re.split(r"[\r\n]+", screen) if "tick" in p]
    assert pieces == ["tick 1", "tick 2", "tick 3"], screen
    assert "succeeded" in screen, screen


def test_unknown_options_of_run_are_errors_and_queue_nothing(
    address: str, direct: Direct, runner: RunnerProcess
) -> None:
    before = len(direct.jobs())
    result = cli(address, "run up --target web --dry-run")
    assert result.returncode == 2, show(result)
    assert "No such option: --dry-run" in result.stderr, show(result)
    assert "Traceback" not in result.stderr, show(result)
    assert len(direct.jobs()) == before

    # After `--` the same text is the command's own argument.
    echoed = ran(address, "run exec --target web --", "echo --dry-run")
    assert echoed.stdout.splitlines() == ["--dry-run"], show(echoed)
    job = direct.job(queued_id(echoed))
    assert list(job.command.cli_args.args) == ["echo --dry-run"]


def test_cancel_of_a_running_job_says_cancel_requested(
    address: str, direct: Direct, runner: RunnerProcess
) -> None:
    job_id = ok(address, "job queue exec --target web --", "sleep 60").strip()
    direct.wait_job(job_id, vs.Job.RUNNING)
    said = ok(address, f"job cancel {job_id}").strip()
    assert said == f"job {job_id}: cancel requested (cancel again to force it)", said
    job = direct.wait_job(job_id, vs.Job.ERROR)
    assert job.HasField("cancel_time")
    said = ok(address, f"job cancel {job_id}").strip()
    assert said == f"job {job_id} had already finished: error", said


def test_noop_job_queued_runs_and_shows_in_list_and_get(
    address: str, direct: Direct, runner: RunnerProcess
) -> None:
    assert ok(address, "job validate --op noop").strip() == "valid; a runner can take it now"

    job_id = ok(address, "job queue --op noop").strip()
    assert JOB_ID_RE.match(job_id), job_id
    direct.wait_job(job_id, vs.Job.SUCCESS)

    listed = ok(address, "job list")
    assert cli_table(listed)[0] == ["ID", "STATE", "OPERATION", "SCOPE", "RUNNER", "QUEUED"]
    assert row_of(listed, job_id)[1:4] == ["SUCCESS", "noop", RUNNER]

    got = ok_json(address, f"job get {job_id}")
    assert (got["id"], got["state"], got["noop"]) == (job_id, "SUCCESS", {})
    assert got["assigned_runner"]["id"] == RUNNER
    assert got["target_runner"] == {"any": {}}


# -- runners -------------------------------------------------------------------------


def test_runner_is_online_while_it_runs_and_offline_once_stopped(
    address: str, direct: Direct, runner: RunnerProcess
) -> None:
    listed = ok(address, "runner list")
    assert cli_table(listed)[0][:2] == ["ID", "STATUS"]
    assert row_of(listed, RUNNER)[1] == "online", listed

    assert ok_json(address, f"runner get {RUNNER}")["id"] == RUNNER

    assert runner.proc is not None
    runner.proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    assert runner.proc.wait(10) == 0, runner.output()
    assert time.monotonic() - started < 5, "the idle runner took long to stop"

    listed = ok(address, "runner list")
    assert row_of(listed, RUNNER)[1] == "offline", listed


# -- jobs no runner takes ---------------------------------------------------------------


@pytest.mark.usefixtures("no_runner")
def test_queued_job_is_listed_by_state_and_cancelled(address: str, direct: Direct) -> None:
    validated = ok(address, "job validate --op noop").strip()
    assert validated == "valid; no connected runner can take it"

    job_id = ok(address, "job queue --op noop").strip()
    assert JOB_ID_RE.match(job_id), job_id

    queued = ok(address, "job list --state queued")
    assert row_of(queued, job_id)[1:3] == ["QUEUED", "noop"]
    assert {row[1] for row in cli_table(queued)[1]} == {"QUEUED"}, queued

    # A queued job cannot run any more: it ends at once, as ERROR "canceled".
    assert ok(address, f"job cancel {job_id}").strip() == f"job {job_id}: cancelled"
    job = direct.job(job_id)
    assert (job.state, job.error.message) == (vs.Job.ERROR, "canceled")


@pytest.mark.usefixtures("no_runner")
@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        ("", vs.Job.DataSource(local=vs.Job.Local())),
        ("--local", vs.Job.DataSource(local=vs.Job.Local())),
        (
            "--git https://example.com/r.git --ref v1 --path sub/dir",
            vs.Job.DataSource(
                git=vs.Job.Git(url="https://example.com/r.git", ref="v1", path="sub/dir")
            ),
        ),
        (
            "--git https://example.com/r.git",
            vs.Job.DataSource(git=vs.Job.Git(url="https://example.com/r.git")),
        ),
    ],
    ids=["default", "local", "git-ref-path", "git"],
)
def test_queued_jobs_carry_a_data_source(
    address: str, direct: Direct, flags: str, expected: vs.Job.DataSource
) -> None:
    for command in (f"job queue --op noop {flags}", f"job queue up --target web {flags}"):
        job_id = ok(address, command).strip()
        try:
            assert direct.job(job_id).data_source == expected, command
        finally:
            direct.vagrant.CancelJob(vs.CancelJobRequest(job_id=job_id), timeout=10)


@pytest.mark.usefixtures("no_runner")
def test_a_project_with_a_data_source_gives_it_to_jobs_by_default(
    address: str, direct: Direct
) -> None:
    """Upstream's QueueJob rule: a job sent without one takes its project's."""
    source = vs.Job.DataSource(git=vs.Job.Git(url="https://example.com/p.git", ref="main"))
    basis = direct.vagrant.UpsertBasis(
        vs.UpsertBasisRequest(basis=t.basis("ds-basis", "/srv/ds-basis")), timeout=10
    ).basis
    project = t.project(t.basis_ref(basis), name="ds-project", data_source=source)
    direct.vagrant.UpsertProject(vs.UpsertProjectRequest(project=project), timeout=10)
    for flags, expected in (("", source), ("--local", vs.Job.DataSource(local=vs.Job.Local()))):
        job_id = ok(address, f"job queue up --project ds-project {flags}").strip()
        try:
            assert direct.job(job_id).data_source == expected, flags
        finally:
            direct.vagrant.CancelJob(vs.CancelJobRequest(job_id=job_id), timeout=10)


@pytest.mark.usefixtures("no_runner")
def test_prune_reports_what_it_pruned(address: str, direct: Direct) -> None:
    for _ in range(55):
        job_id = direct.vagrant.QueueJob(vs.QueueJobRequest(job=t.noop_job()), timeout=10).job_id
        direct.vagrant.CancelJob(vs.CancelJobRequest(job_id=job_id), timeout=10)
    jobs = direct.jobs()
    finished = sum(j.state in (vs.Job.ERROR, vs.Job.SUCCESS) for j in jobs)
    keep = 50  # PruneOldJobs keeps the newest 50 finished jobs, and every active one
    pruned, left = finished - keep, len(jobs) - (finished - keep)
    assert pruned >= 5

    assert ok(address, "job prune").strip() == f"pruned {pruned} jobs; {left} left"
    assert len(direct.jobs()) == left


@dataclass
class Expired:
    """`waystation run exec --target web --expires-in 3s -- true` with no runner, on a tty."""

    returncode: int
    stdout: str
    terminal: str  # what stderr, a pseudo-terminal, showed
    seconds: float

    @property
    def summary(self) -> str:
        lines = [line for line in self.terminal.splitlines() if "✗" in line]
        assert lines, self.terminal
        return lines[-1]


@pytest.fixture(scope="module")
def expired(address: str, no_runner: None) -> Expired:
    primary, secondary = os.openpty()
    shown = bytearray()

    def drain() -> None:
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed its side
                return
            if not chunk:
                return
            shown.extend(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    started = time.monotonic()
    try:
        with subprocess.Popen(
            _argv("run exec --target web --expires-in 3s -- true"),
            env=_env(address),
            stdout=subprocess.PIPE,
            stderr=secondary,
        ) as proc:
            os.close(secondary)
            secondary = -1
            reader.start()
            stdout, _ = proc.communicate(timeout=30)
        reader.join(10)
    finally:
        if secondary != -1:
            os.close(secondary)
        os.close(primary)
    terminal = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))
    return Expired(proc.returncode, stdout.decode(), terminal, time.monotonic() - started)


def test_run_with_no_runner_waits_then_fails_with_a_summary(expired: Expired) -> None:
    assert expired.returncode == 1, expired
    assert "Traceback" not in expired.terminal + expired.stdout, expired
    assert expired.stdout == "", expired
    assert 3 <= expired.seconds < 20, expired
    assert "queued, position 1" in expired.terminal, expired
    assert re.search(r"✗ job \w+ failed: .+ \(\d+\.\ds\)", expired.summary), expired


def test_run_with_no_runner_says_the_job_expired(expired: Expired) -> None:
    assert re.search(r"expire|no runner", expired.summary), expired.summary


def test_run_with_no_runner_says_none_is_connected(expired: Expired) -> None:
    waiting = expired.terminal.replace(expired.summary, "")
    assert "no runner" in waiting or "no connected runner" in waiting, waiting


# -- errors --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("command", "fragments"),
    [
        ("job get NOPE", ["not found"]),
        ("job watch NOPE", ["not found"]),
        ("run up", ["--target"]),
        ("job queue --op bogus", ["--op must be one of", "noop", "'bogus'"]),
        ("job queue", ["needs a COMMAND"]),
        ("job queue --op noop --git https://x/r.git --local", ["--git and --local", "one"]),
        ("job queue --op noop --ref main", ["--ref and --path go with --git"]),
        ("run up --target web --path sub", ["--ref and --path go with --git"]),
        ("run up --target web --git https://x/r.git --path ../up", ["--path must be relative"]),
        ("job queue --op noop --git https://x/r.git --path /abs", ["--path must be relative"]),
    ],
    ids=[
        "get-unknown",
        "watch-unknown",
        "run-without-target",
        "bogus-op",
        "no-command",
        "git-and-local",
        "ref-without-git",
        "run-path-without-git",
        "path-escapes",
        "path-absolute",
    ],
)
def test_errors_are_one_line_and_exit_1(address: str, command: str, fragments: list[str]) -> None:
    assert_cli_error(cli_once(address, command), *fragments)


def test_job_not_found_names_the_id(address: str) -> None:
    assert_cli_error(cli_once(address, "job get NOPE"), "'NOPE'")


def test_job_list_with_a_bogus_state_is_one_error_line(address: str) -> None:
    assert_cli_error(cli(address, "job list --state bogus"), "--state must be one of", "QUEUED")
