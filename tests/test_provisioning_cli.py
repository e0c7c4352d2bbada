"""Provisioning as people run it: templates, workspaces, quotas and provisioner daemons.

Every test runs `python -m waystation.cli.main ...` as child processes against
`waystation server run` (t.ServerProcess, also a child process), with real
`waystation provisioner` daemons taking the jobs over gRPC on loopback. Each
test gets its own server, so what it sees in the queue is its own doing.
Set-up and checks that are not under test (waiting for a job to reach a
state) go over gRPC directly; everything a person would type goes through the
CLI.

Templates: `template init` writes the example (a machine costing 1 a day,
a `size` parameter); `held` templates are echo archives whose apply never
completes (t.echo_template(hold_apply=True)), to keep a build running until
it is cancelled or its daemon dies.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from waystation import testing as t
from waystation.auth import tokens
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.provisionerd.proto import provisionerd_pb2_grpc as pd_grpc
from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.protocol.waystation.v1 import provisioning_pb2_grpc as pv_grpc
from waystation.testing import assert_cli_error, cli_table, show

Result = subprocess.CompletedProcess[str]
Job = pv.ProvisionerJob
IMPORT_JOB_RE = re.compile(r"import job (\w{26})")
BUILD_JOB_RE = re.compile(r"build #\d+ \(\w+\), job (\w{26})")
ENDED = (Job.SUCCEEDED, Job.FAILED, Job.CANCELED)
CANCEL_ANSWERS = ("canceling", "canceled")  # a running job's, to `cancel`

# Each CLI run costs a second or more here, and a test makes a dozen or two.
pytestmark = pytest.mark.timeout(300)

# -- harness ---------------------------------------------------------------------------


def _env(address: str, config: Path, token: str = "") -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WAYSTATION_")}
    for noise in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "LINES", "NO_COLOR"):
        env.pop(noise, None)
    env["WAYSTATION_ADDR"] = address
    env["WAYSTATION_CONFIG"] = str(config)  # never the user's saved contexts
    if token:
        env["WAYSTATION_TOKEN"] = token
    env["COLUMNS"] = "120"
    return env


def _argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "waystation.cli.main", *args]


class Site:
    """A server and the CLI pointed at it (with its token, when auth is on)."""

    def __init__(self, server: t.ServerProcess, home: Path) -> None:
        self.server = server
        self.home = home
        self.config = home / "contexts.json"

    @property
    def address(self) -> str:
        return self.server.address

    @property
    def token(self) -> str:
        return self.server.token

    def env(self, token: str | None = None) -> dict[str, str]:
        return _env(self.address, self.config, self.token if token is None else token)

    def cli(self, *args: str, token: str | None = None, timeout: float = 120) -> Result:
        """`waystation ARGS`; never raises on the exit status."""
        return subprocess.run(
            _argv(*args),
            env=self.env(token),
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def ran(self, *args: str, status: int = 0) -> Result:
        """A run that must exit with `status` and print no traceback."""
        result = self.cli(*args)
        assert result.returncode == status, show(result)
        assert "Traceback" not in result.stderr + result.stdout, show(result)
        return result

    def ok(self, *args: str) -> Result:
        return self.ran(*args)

    def ok_json(self, *args: str) -> Any:
        return json.loads(self.ok(*args, "--json").stdout)

    # -- direct gRPC, for what is not under test --------------------------------------

    @contextlib.contextmanager
    def stub(self) -> Iterator[pv_grpc.ProvisioningStub]:
        channel = self.server.connection().channel()
        try:
            yield pv_grpc.ProvisioningStub(channel)
        finally:
            channel.close()

    def job(self, job_id: str) -> Job:
        with self.stub() as stub:
            return stub.GetProvisionerJob(pv.GetProvisionerJobRequest(id=job_id), timeout=10)

    def wait_job(self, job_id: str, *statuses: Job.Status.ValueType, timeout: float = 90) -> Job:
        """Poll until the job's status is one of `statuses` (default: ended)."""
        wanted = statuses or ENDED
        deadline = time.monotonic() + timeout
        while True:
            job = self.job(job_id)
            if job.status in wanted:
                return job
            names = [Job.Status.Name(s) for s in wanted]
            assert time.monotonic() < deadline, (
                f"job {job_id} is {Job.Status.Name(job.status)}, not {names}: {job}"
            )
            time.sleep(0.1)

    def daemons(self) -> list[pv.ProvisionerDaemon]:
        with self.stub() as stub:
            request = pv.ListProvisionerDaemonsRequest()
            return list(stub.ListProvisionerDaemons(request, timeout=10).daemons)


class DaemonProcess:
    """`waystation provisioner --provisioner echo --id ID ...` as a child process."""

    def __init__(self, site: Site, daemon_id: str, *args: str, token: str | None = None) -> None:
        self.site = site
        self.daemon_id = daemon_id
        self.args = args
        self.token = token
        self.log = site.home / f"daemon-{daemon_id}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def spawn(self) -> subprocess.Popen[bytes]:
        argv = _argv("provisioner", "--provisioner", "echo", "--id", self.daemon_id, *self.args)
        with self.log.open("ab") as log:
            self.proc = subprocess.Popen(
                argv,
                env=self.site.env(self.token),
                cwd=self.site.home,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.proc

    def start(self, timeout: float = 60) -> DaemonProcess:
        """Spawn and wait until the server has seen it (its first acquire)."""
        proc = self.spawn()
        deadline = time.monotonic() + timeout
        while not any(d.id == self.daemon_id and d.online for d in self.site.daemons()):
            assert proc.poll() is None, f"the daemon exited:\n{self.output()}"
            assert time.monotonic() < deadline, f"the daemon never connected:\n{self.output()}"
            time.sleep(0.1)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, finish: float = 15) -> int:
        """SIGTERM (finish the job in hand, for `finish` seconds), SIGTERM again
        (cancel it), then SIGKILL."""
        assert self.proc is not None
        for wait in (finish, 15):
            if self.proc.poll() is not None:
                break
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(wait)
        if self.proc.poll() is None:
            self.proc.kill()
        return self.proc.wait(30)

    def kill(self) -> None:
        """SIGKILL: no report, no goodbye, as in a crash."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(30)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


class World:
    """Servers and daemons a test started; all stopped when it ends."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.servers: list[t.ServerProcess] = []
        self.daemons: list[DaemonProcess] = []

    def site(self, db_url: str = "", *args: str, auth: bool = False, port: int = 0) -> Site:
        home = self.tmp_path / f"site{len(self.servers)}"
        home.mkdir()
        if port:
            args = ("--listen", f"127.0.0.1:{port}", *args)  # the last --listen wins
        server = t.ServerProcess(home / "data", db_url, *args, auth=auth)
        self.servers.append(server)
        server.start()
        return Site(server, home)

    def daemon(
        self, site: Site, daemon_id: str, *args: str, token: str | None = None, start: bool = True
    ) -> DaemonProcess:
        daemon = DaemonProcess(site, daemon_id, *args, token=token)
        self.daemons.append(daemon)
        return daemon.start() if start else daemon

    def close(self) -> None:
        for daemon in self.daemons:
            if daemon.running:
                daemon.stop(finish=1)
        for server in self.servers:
            proc = server.proc
            if proc is None or proc.poll() is not None:
                continue
            try:
                server.stop(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(30)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    found = World(tmp_path)
    try:
        yield found
    finally:
        found.close()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def import_job(result: Result) -> str:
    found = IMPORT_JOB_RE.search(result.stderr)
    assert found, show(result)
    return found.group(1)


def build_job(result: Result) -> str:
    found = BUILD_JOB_RE.search(result.stderr)
    assert found, show(result)
    return found.group(1)


def row_of(stdout: str, column: int, value: str) -> list[str]:
    """The one table row whose cell `column` is `value`."""
    found = [row for row in cli_table(stdout)[1] if len(row) > column and row[column] == value]
    assert len(found) == 1, f"{value!r} not once in column {column} of:\n{stdout}"
    return found[0]


def line_of(stdout: str, fragment: str) -> str:
    found = [line.rstrip() for line in stdout.splitlines() if fragment in line]
    assert len(found) == 1, f"{fragment!r} not on exactly one line of:\n{stdout}"
    return found[0]


def example(site: Site, name: str = "example") -> Path:
    """`template init` into a fresh directory named `name`."""
    directory = site.home / name
    result = site.ok("template", "init", str(directory))
    assert "wrote" in result.stderr, show(result)
    return directory


def held(site: Site, name: str = "held") -> Path:
    """A template whose import succeeds and whose builds' apply never completes."""
    directory = site.home / name
    directory.mkdir()
    data = t.echo_template(logs=("holding on",), hold_apply=True)
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as archive:
        for member in archive.getmembers():
            extracted = archive.extractfile(member)
            assert extracted is not None
            (directory / member.name).write_bytes(extracted.read())
    return directory


def push(site: Site, directory: Path, *extra: str) -> Result:
    """`template push DIR --provisioner echo`, followed to a successful import."""
    result = site.ok("template", "push", str(directory), "--provisioner", "echo", *extra)
    assert f"job {import_job(result)}: succeeded" in result.stderr, show(result)
    return result


def push_detached(site: Site, directory: Path, *extra: str) -> str:
    """`template push --detach`: the import job's id."""
    result = site.ok(
        "template", "push", str(directory), "--provisioner", "echo", "--detach", *extra
    )
    return import_job(result)


def hold_build(site: Site, workspace: str, template: str, daemon: DaemonProcess) -> str:
    """Create a workspace from a held template; its build is running on `daemon`."""
    job_id = build_job(site.ok("workspace", "create", workspace, "-t", template, "--detach"))
    job = site.wait_job(job_id, Job.RUNNING)
    assert job.daemon_id == daemon.daemon_id, job
    return job_id


# -- 1. the newcomer's journey ---------------------------------------------------------


def test_newcomer_pushes_a_template_and_runs_a_workspace_through_its_life(
    world: World, backend_url: str
) -> None:
    site = world.site(backend_url)
    daemon = world.daemon(site, "d1")

    template = example(site, "dev")
    assert sorted(p.name for p in template.iterdir()) == sorted(
        [
            "0.parse.protobuf",
            "0.plan.protobuf",
            "1.plan.protobuf",
            "0.start.apply.protobuf",
            "1.start.apply.protobuf",
            "2.start.apply.protobuf",
            "0.stop.apply.protobuf",
            "1.stop.apply.protobuf",
            "0.destroy.apply.protobuf",
            "1.destroy.apply.protobuf",
            "README.md",
        ]
    )

    pushed = push(site, template)
    assert "template dev version v1" in pushed.stderr, show(pushed)
    for stage in (
        "==> Setting up",
        "==> Parsing template parameters",
        "==> Detecting persistent resources",
        "==> Detecting ephemeral resources",
        "==> Cleaning Up",
    ):
        assert stage in pushed.stdout.splitlines(), f"{stage!r} missing:\n{show(pushed)}"
    assert "planning a dev machine" in pushed.stdout, show(pushed)
    assert line_of(pushed.stdout, "size").split() == ["size", "string", "small", "no"]
    started, stopped = pushed.stdout.split("resources when started")[1].split(
        "resources when stopped"
    )
    assert ["echo_machine", "dev", "1"] in [line.split() for line in started.splitlines()]
    assert ["echo_machine", "dev", "1"] in [line.split() for line in stopped.splitlines()]

    header, rows = cli_table(site.ok("template", "list").stdout)
    assert header == ["NAME", "VERSIONS", "ACTIVE", "VERSION"]
    assert [row[:2] for row in rows] == [["dev", "1"]]
    versions = site.ok("template", "versions", "dev").stdout
    assert row_of(versions, 0, "v1")[2:4] == ["echo", "succeeded"]  # no tags: an empty cell

    created = site.ok("workspace", "create", "box", "--template", "dev", "--owner", "ann")
    assert "workspace box: build #1 (start)" in created.stderr, show(created)
    assert "==> Starting workspace" in created.stdout, show(created)
    assert "creating the dev machine" in created.stdout, show(created)
    assert "the dev machine is running" in created.stdout, show(created)
    assert f"job {build_job(created)}: succeeded" in created.stderr, show(created)

    listed = site.ok("workspace", "list").stdout
    assert row_of(listed, 1, "box") == ["ann", "box", "dev", "#1", "start", "succeeded", "1"]

    stopped_run = site.ok("workspace", "stop", "box", "--owner", "ann")
    assert "build #2 (stop)" in stopped_run.stderr, show(stopped_run)
    assert "stopping the dev machine" in stopped_run.stdout, show(stopped_run)

    shown = site.ok("workspace", "show", "box", "--owner", "ann").stdout
    assert shown.startswith("workspace ann/box ("), shown
    assert "template: dev" in shown
    builds = shown[shown.index("BUILD") :]
    assert [row[:3] for row in cli_table(builds)[1]] == [
        ["#2", "stop", "succeeded"],
        ["#1", "start", "succeeded"],
    ]

    deleted = site.ok("workspace", "delete", "box", "--owner", "ann")
    assert "build #3 (destroy)" in deleted.stderr, show(deleted)
    assert "destroying the dev machine" in deleted.stdout, show(deleted)
    gone = site.ok("workspace", "list")
    assert gone.stdout == "" and "no workspaces" in gone.stderr, show(gone)
    everything = site.ok("workspace", "list", "--all").stdout
    assert row_of(everything, 1, "box")[3:6] == ["#3", "destroy", "deleted"]

    daemons = site.ok("provisioner", "list").stdout
    assert row_of(daemons, 0, "d1")[1] == "echo"
    assert row_of(daemons, 0, "d1")[-1] == "idle"

    jobs = site.ok_json("provisioner", "jobs", "list", "--all")
    assert [(j["type"], j["status"], j["daemon_id"]) for j in jobs] == [
        ("TEMPLATE_IMPORT", "SUCCEEDED", "d1"),
        ("WORKSPACE_BUILD", "SUCCEEDED", "d1"),
        ("WORKSPACE_BUILD", "SUCCEEDED", "d1"),
        ("WORKSPACE_BUILD", "SUCCEEDED", "d1"),
    ]
    assert daemon.running, daemon.output()


# -- 2. why a job waits ----------------------------------------------------------------


def test_pending_jobs_say_why_they_wait_and_where_they_are_in_the_queue(world: World) -> None:
    site = world.site()
    template = example(site)

    # No daemon at all.
    first = push_detached(site, template)
    pending = site.ok("provisioner", "jobs", "list").stdout
    row = row_of(pending, 0, first)
    assert row[1:4] == ["template_import", "echo", "pending"], pending
    assert "no connected daemon serves provisioner echo with tags {}" in line_of(pending, first)
    shown = site.ok("provisioner", "jobs", "show", first).stdout
    assert "waiting: no connected daemon serves provisioner echo with tags {}" in shown, shown

    # A daemon comes: the job that waited runs.
    plain = world.daemon(site, "plain")
    watched = site.ok("provisioner", "jobs", "watch", first)
    assert "==> Parsing template parameters" in watched.stdout, show(watched)
    assert f"job {first}: succeeded" in watched.stderr, show(watched)
    assert site.job(first).daemon_id == "plain"

    # The daemon is busy with a build that never ends: later jobs queue behind it.
    push(site, held(site))
    hold_build(site, "busy", "held", plain)
    second = push_detached(site, template, "--name", "second")
    third = push_detached(site, template, "--name", "third")
    pending = site.ok("provisioner", "jobs", "list").stdout
    assert line_of(pending, second).endswith("queued, position 1 of 2"), pending
    assert line_of(pending, third).endswith("queued, position 2 of 2"), pending
    assert "busy: " in line_of(site.ok("provisioner", "list").stdout, "plain")

    # A job that needs a tag no connected daemon has says so, queue or not.
    tagged = push_detached(site, template, "--name", "eu", "--tag", "region=eu")
    pending = site.ok("provisioner", "jobs", "list").stdout
    assert row_of(pending, 0, tagged)[3] == "region=eu", pending
    assert line_of(pending, tagged).endswith(
        "no connected daemon serves provisioner echo with tags {region=eu}"
    ), pending
    assert line_of(pending, third).endswith("queued, position 2 of 2"), pending

    # A daemon with the tag takes the queue in order (untagged jobs fit it too).
    world.daemon(site, "eu", "--tag", "region=eu")
    watched = site.ok("provisioner", "jobs", "watch", tagged)
    assert f"job {tagged}: succeeded" in watched.stderr, show(watched)
    assert site.job(tagged).daemon_id == "eu"
    for job_id in (second, third):
        assert site.wait_job(job_id).status == Job.SUCCEEDED
    versions = site.ok("template", "versions", "eu").stdout
    assert row_of(versions, 0, "v1")[2:5] == ["echo", "region=eu", "succeeded"], versions
    # Nothing is left waiting (the build that never ends runs on).
    empty = site.ok("provisioner", "jobs", "list")
    assert empty.stdout == "" and "no pending provisioner jobs" in empty.stderr, show(empty)


# -- 3. cancel -------------------------------------------------------------------------


def test_cancel_running_build_pending_job_and_finished_job(world: World) -> None:
    site = world.site()
    daemon = world.daemon(site, "d1")
    push(site, held(site))

    # A running build: the daemon is told, stops the provisioner and reports.
    running = hold_build(site, "hold", "held", daemon)
    canceled = site.ok("workspace", "cancel", "hold")
    # Canceling: asked to stop (unless its report beat this answer, a narrow window).
    answers = {f"job {running}: {status}" for status in CANCEL_ANSWERS}
    assert canceled.stderr.strip() in answers, show(canceled)
    job = site.wait_job(running)
    assert job.status == Job.CANCELED, job
    shown = site.ok("workspace", "show", "hold").stdout
    assert row_of(shown, 0, "#1")[1:3] == ["start", "canceled"], shown
    watched = site.ran("provisioner", "jobs", "watch", running, status=1)
    assert "holding on" in watched.stdout, show(watched)
    assert "canceled: stopping the provisioner" in watched.stdout, show(watched)
    assert f"job {running}: canceled" in watched.stderr, show(watched)

    # A pending job (the daemon is busy again) ends at once.
    busy = hold_build(site, "hold2", "held", daemon)
    waiting = push_detached(site, example(site))
    assert site.job(waiting).status == Job.PENDING
    result = site.ok("provisioner", "jobs", "cancel", waiting)
    assert result.stderr.strip() == f"job {waiting}: canceled", show(result)
    assert site.job(waiting).status == Job.CANCELED
    pending = site.ok("provisioner", "jobs", "list")
    assert waiting not in pending.stdout, show(pending)
    versions = site.ok("template", "versions", "example").stdout
    assert row_of(versions, 0, "v1")[3] == "canceled", versions

    # Cancelling what has ended changes nothing and is no error.
    again = site.ok("provisioner", "jobs", "cancel", waiting)
    assert again.stderr.strip() == f"job {waiting}: canceled", show(again)
    imported = site.ok_json("provisioner", "jobs", "list", "--all")[0]
    assert imported["type"] == "TEMPLATE_IMPORT" and imported["status"] == "SUCCEEDED"
    done = site.ok("provisioner", "jobs", "cancel", imported["id"])
    assert done.stderr.strip() == f"job {imported['id']}: succeeded", show(done)
    assert site.job(imported["id"]).status == Job.SUCCEEDED

    # The busy build is still running; the daemon still holds it.
    assert site.job(busy).status == Job.RUNNING
    site.ok("workspace", "cancel", "hold2")
    assert site.wait_job(busy).status == Job.CANCELED


# -- 4. quota --------------------------------------------------------------------------


def test_quota_refuses_a_second_workspace_until_cleared(world: World) -> None:
    site = world.site()
    world.daemon(site, "d1")
    push(site, example(site, "dev"))

    assert site.ok("quota", "set", "alice", "1").stdout.strip() == (
        "alice: 0 of 1 in use (daily cost)"
    )
    first = site.ok("workspace", "create", "one", "-t", "dev", "--owner", "alice")
    assert "quota: 1 of 1 in use" in first.stdout, show(first)

    second = site.ran("workspace", "create", "two", "-t", "dev", "--owner", "alice", status=1)
    assert "==> Commit quota" in second.stdout, show(second)
    assert "insufficient quota" in second.stderr, show(second)
    assert f"job {build_job(second)}: failed" in second.stderr, show(second)
    assert "creating the dev machine" not in second.stdout, show(second)
    shown = site.ok("workspace", "show", "two", "--owner", "alice").stdout
    assert "insufficient quota" in shown, shown
    assert row_of(shown, 0, "#1")[1:3] == ["start", "failed"], shown

    assert site.ok("quota", "show", "alice").stdout.strip() == "alice: 1 of 1 in use (daily cost)"
    assert site.ok_json("quota", "show", "alice")["allowance"] in (1, "1")
    cleared = site.ok("quota", "clear", "alice").stdout.strip()
    assert cleared == "alice: 1 of unlimited in use (daily cost)"

    # With no limit the refused workspace starts.
    again = site.ok("workspace", "start", "two", "--owner", "alice")
    assert "creating the dev machine" in again.stdout, show(again)
    assert site.ok("quota", "show", "alice").stdout.strip() == (
        "alice: 2 of unlimited in use (daily cost)"
    )


# -- 5. a daemon that dies mid-build ---------------------------------------------------

# The daemon heartbeats (UpdateJob) every 5 s while a job is quiet: a hang
# timeout shorter than that fails healthy jobs too (try --hang-timeout 2s).
# This one leaves a margin for a loaded machine.
HANG = 10.0


def test_daemon_killed_mid_build_hangs_the_job_and_a_new_daemon_restarts_it(
    world: World,
) -> None:
    site = world.site("", "--hang-timeout", f"{HANG:g}s", "--poll-interval", "250ms")
    doomed = world.daemon(site, "doomed")
    push(site, held(site, "dev"))
    job_id = hold_build(site, "box", "dev", doomed)

    # While the daemon lives, its heartbeats keep the job alive past the timeout.
    time.sleep(HANG + 3)
    assert site.job(job_id).status == Job.RUNNING, site.job(job_id)

    doomed.kill()
    job = site.wait_job(job_id)
    assert job.status == Job.FAILED, job
    assert job.error_code == "HUNG", job

    shown = site.ok("provisioner", "jobs", "show", job_id).stdout
    error = line_of(shown, "error:")
    assert "no update from provisioner daemon doomed" in error, shown
    assert "hung" in error, shown
    assert line_of(shown, job_id).split()[-1] == "failed", shown

    watched = site.ran("provisioner", "jobs", "watch", job_id, status=1)
    assert "holding on" in watched.stdout, show(watched)
    assert "==> Hang detector" in watched.stdout, show(watched)
    assert "no update from provisioner daemon doomed" in watched.stdout, show(watched)
    assert f"job {job_id}: failed" in watched.stderr, show(watched)

    listed = site.ok("workspace", "list").stdout
    assert row_of(listed, 1, "box")[3:6] == ["#1", "start", "failed"], listed

    # A new daemon, a template version that completes: the workspace starts again.
    world.daemon(site, "fresh")
    push(site, example(site, "fixed"), "--name", "dev")
    started = site.ok("workspace", "start", "box")
    assert "build #2 (start)" in started.stderr, show(started)
    assert "creating the dev machine" in started.stdout, show(started)
    assert site.job(build_job(started)).daemon_id == "fresh"
    listed = site.ok("workspace", "list").stdout
    assert row_of(listed, 1, "box")[3:6] == ["#2", "start", "succeeded"], listed


# -- 6. the server restarts under a daemon ----------------------------------------------


def test_idle_daemon_reconnects_after_a_server_restart(world: World) -> None:
    site = world.site(port=free_port())
    daemon = world.daemon(site, "steady")
    template = example(site)
    push(site, template)

    address = site.address
    assert site.server.stop() == 0, site.server.output()
    assert daemon.running, daemon.output()
    assert site.server.start() == address

    again = push(site, template)
    assert site.job(import_job(again)).daemon_id == "steady"
    assert daemon.running, daemon.output()
    assert "server unreachable" in daemon.output()


def test_cancel_reaches_a_daemon_whose_server_was_killed_and_restarted(
    world: World, backend_url: str
) -> None:
    """The daemon holds a job while the server dies (kill -9) and comes back; a
    cancel made after the restart reaches it through its retried UpdateJob, and
    the job ends CANCELED by the daemon's own report (not failed as hung)."""
    site = world.site(backend_url, port=free_port())
    daemon = world.daemon(site, "steady")
    push(site, held(site))
    job_id = hold_build(site, "box", "held", daemon)

    address = site.address
    site.server.kill()
    assert site.server.start() == address
    assert site.job(job_id).status == Job.RUNNING  # still held by the same daemon id

    canceled = site.ok("workspace", "cancel", "box")
    answers = {f"job {job_id}: {status}" for status in CANCEL_ANSWERS}
    assert canceled.stderr.strip() in answers, show(canceled)
    job = site.wait_job(job_id)
    assert job.status == Job.CANCELED, job
    assert job.error_code != "HUNG", job
    assert job.daemon_id == "steady", job
    watched = site.ran("provisioner", "jobs", "watch", job_id, status=1)
    assert "canceled: stopping the provisioner" in watched.stdout, show(watched)
    assert "Hang detector" not in watched.stdout, show(watched)
    assert daemon.running, daemon.output()

    # And it takes new work.
    again = push(site, example(site))
    assert site.job(import_job(again)).daemon_id == "steady"


# -- 7. daemon credentials -------------------------------------------------------------


def test_daemon_needs_a_valid_token_when_auth_is_on(world: World) -> None:
    site = world.site(auth=True)
    minted = site.ok("token", "login").stdout.strip()
    assert tokens.unverified(minted)[0].login

    # With a login token it serves: an import runs.
    daemon = world.daemon(site, "trusted", token=minted)
    pushed = push(site, example(site))
    assert site.job(import_job(pushed)).daemon_id == "trusted"
    assert daemon.running, daemon.output()

    # With none it stops at once.
    anonymous = world.daemon(site, "anonymous", token="", start=False)
    assert anonymous.spawn().wait(60) == 1
    output = anonymous.output()
    assert "Traceback" not in output, output
    error = line_of(output, "error: ")
    assert "Authorization token is not supplied" in error, output
    assert "--token" in error, output

    # Nor with a revoked one.
    ident = tokens.token_id_hex(tokens.unverified(minted)[0])
    assert row_of(site.ok("token", "inspect", minted).stdout, 0, ident)[1] == "login"
    assert site.ok("token", "revoke", ident).stdout.strip() == f"revoked {ident}"
    revoked = world.daemon(site, "revoked", token=minted, start=False)
    assert revoked.spawn().wait(60) == 1
    output = revoked.output()
    assert "Traceback" not in output, output
    assert "token has been revoked" in line_of(output, "error: "), output
    assert not any(d.id in ("anonymous", "revoked") for d in site.daemons())


def test_revoking_a_connected_daemons_token_stops_it_getting_jobs(world: World) -> None:
    site = world.site(auth=True)
    minted = site.ok("token", "login").stdout.strip()
    world.daemon(site, "doomed", token=minted)  # connected: parked, waiting for a job
    ident = tokens.token_id_hex(tokens.unverified(minted)[0])
    assert site.ok("token", "revoke", ident).stdout.strip() == f"revoked {ident}"

    job_id = push_detached(site, example(site))
    world.daemon(site, "trusted", token=site.token)
    job = site.wait_job(job_id, Job.RUNNING, *ENDED)
    assert job.daemon_id == "trusted", job
    assert site.wait_job(job_id).status == Job.SUCCEEDED


def test_a_daemon_that_exited_no_longer_counts_as_connected(world: World) -> None:
    site = world.site()
    daemon = world.daemon(site, "gone")
    assert daemon.stop() == 0, daemon.output()

    job_id = push_detached(site, example(site))
    pending = site.ok("provisioner", "jobs", "list").stdout
    assert line_of(pending, job_id).endswith(
        "no connected daemon serves provisioner echo with tags {}"
    ), pending
    assert row_of(site.ok("provisioner", "list").stdout, 0, "gone")[-1] == "offline"


# -- 8. mistakes -----------------------------------------------------------------------


# -- 9. failures a daemon reports without a type -------------------------------------


class RawDaemon:
    """A daemon driven by the test over ProvisionerDaemon, as Coder's would be."""

    def __init__(self, site: Site, daemon_id: str) -> None:
        self.channel = site.server.connection().channel()
        self.stub = pd_grpc.ProvisionerDaemonStub(self.channel)
        self.metadata: tuple[tuple[str, str | bytes], ...] = tuple(t.daemon_metadata(daemon_id))

    def acquire(self, job_id: str, timeout: float = 60) -> pd.AcquiredJob:
        deadline = time.monotonic() + timeout
        while True:
            job = self.stub.AcquireJob(pd.Empty(), metadata=self.metadata, timeout=30)
            if job.job_id:
                assert job.job_id == job_id, job
                return job
            assert time.monotonic() < deadline, f"job {job_id} never came"

    def fail(self, job_id: str, error: str, code: str = "") -> None:
        failed = pd.FailedJob(job_id=job_id, error=error, error_code=code)  # no type
        self.stub.FailJob(failed, metadata=self.metadata, timeout=30)


def wide(site: Site, *args: str) -> subprocess.Popen[str]:
    """`waystation ARGS` started, not awaited; wide enough that no cell folds."""
    return subprocess.Popen(
        _argv(*args),
        env={**site.env(), "COLUMNS": "400"},
        cwd=site.home,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finished(proc: subprocess.Popen[str], status: int = 0) -> Result:
    stdout, stderr = proc.communicate(timeout=120)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)
    assert result.returncode == status, show(result)
    assert "Traceback" not in stdout + stderr, show(result)
    return result


def last_error(result: Result) -> str:
    """The one `error: ...` line a failed run ends with."""
    lines = result.stderr.splitlines()
    assert lines and lines[-1].startswith("error: "), show(result)
    assert sum(line.startswith("error: ") for line in lines) == 1, show(result)
    return lines[-1]


def test_untyped_failures_show_their_error_and_code_everywhere(
    world: World, backend_url: str
) -> None:
    site = world.site(backend_url)
    daemon = RawDaemon(site, "coder-d1")
    source = site.home / "src"
    source.mkdir()
    (source / "main.tf").write_text("# nothing\n")
    required = "required template variables need values: a"
    code = "REQUIRED_TEMPLATE_VARIABLES"

    # An import: the daemon finds a variable without a value and fails it untyped.
    pushing = wide(site, "template", "push", str(source), "--provisioner", "echo", "-n", "t")
    import_id = import_job(finished_when_failed(pushing, daemon, required, code, variable="a"))
    versions = finished(wide(site, "template", "versions", "t")).stdout
    assert row_of(versions, 0, "v1")[3] == "failed", versions
    assert line_of(versions, "v1 ").endswith(f"{required} ({code})"), versions
    version = site.ok_json("template", "versions", "t")[0]
    assert (version["job"]["error"], version["job"]["error_code"]) == (required, code)

    # A build and a dry run of a version that did import.
    with site.stub() as stub:
        pushed = stub.PushTemplate(
            pv.PushTemplateRequest(template="t", provisioner="echo", archive=t.echo_template()),
            timeout=30,
        )
    daemon.acquire(pushed.version.job_id)
    done = pd.CompletedJob(
        job_id=pushed.version.job_id, template_import=pd.CompletedJob.TemplateImport()
    )
    daemon.stub.CompleteJob(done, metadata=daemon.metadata, timeout=30)
    missing = 'plan: missing parameter "size"'
    creating = wide(site, "workspace", "create", "box", "-t", "t", "--owner", "ann")
    build_id = build_job(
        finished_when_failed(creating, daemon, missing, "MISSING_TEMPLATE_PARAMETER")
    )
    shown = finished(wide(site, "workspace", "show", "box", "--owner", "ann")).stdout
    assert row_of(shown, 0, "#1")[1:3] == ["start", "failed"], shown
    assert line_of(shown, build_id).endswith(f"{missing} (MISSING_TEMPLATE_PARAMETER)"), shown
    build = site.ok_json("workspace", "show", "box", "--owner", "ann")["builds"][0]
    assert (build["job"]["error"], build["job"]["error_code"]) == (
        missing,
        "MISSING_TEMPLATE_PARAMETER",
    )
    planning = wide(site, "workspace", "dry-run", "-t", "t")
    dry = finished_when_failed(planning, daemon, "update job: connection closed", "")
    dry_id = re.search(r"dry run: job (\w{26})", dry.stderr)
    assert dry_id, show(dry)

    # Every job, in the list and in JSON; one on its own.
    listed = finished(wide(site, "provisioner", "jobs", "list", "--all")).stdout
    assert row_of(listed, 0, import_id)[3:5] == ["failed", "coder-d1"], listed  # no tags
    assert line_of(listed, import_id).endswith(f"{required} ({code})"), listed
    assert line_of(listed, build_id).endswith(f"{missing} (MISSING_TEMPLATE_PARAMETER)"), listed
    assert line_of(listed, dry_id.group(1)).endswith("update job: connection closed"), listed
    jobs = {j["id"]: j for j in site.ok_json("provisioner", "jobs", "list", "--all")}
    assert (jobs[import_id]["status"], jobs[import_id]["error_code"]) == ("FAILED", code)
    assert jobs[build_id]["error_code"] == "MISSING_TEMPLATE_PARAMETER"
    assert "error_code" not in jobs[dry_id.group(1)]  # none sent: none shown
    alone = site.ok("provisioner", "jobs", "show", import_id).stdout
    assert f"error: {required} ({code})" in alone, alone


def finished_when_failed(
    proc: subprocess.Popen[str],
    daemon: RawDaemon,
    error: str,
    code: str,
    variable: str = "",
) -> Result:
    """The CLI follows a job the daemon fails untyped; it exits 1 with the error
    and code on its last line."""
    job_id = ""
    try:
        deadline = time.monotonic() + 60
        while not job_id:
            assert proc.poll() is None, "the command ended before its job ran"
            job = daemon.stub.AcquireJob(pd.Empty(), metadata=daemon.metadata, timeout=30)
            job_id = job.job_id
            assert time.monotonic() < deadline, "no job came"
        if variable:
            found = [sdk.TemplateVariable(name=variable, type="string", required=True)]
            update = pd.UpdateJobRequest(job_id=job_id, template_variables=found)
            with pytest.raises(grpc.RpcError) as refused:
                daemon.stub.UpdateJob(update, metadata=daemon.metadata, timeout=30)
            assert isinstance(refused.value, grpc.Call)
            assert refused.value.details() == error
        daemon.fail(job_id, error, code)
    except BaseException:
        proc.kill()
        raise
    result = finished(proc, status=1)
    assert f"job {job_id}: failed" in result.stderr, show(result)
    assert last_error(result) == (f"error: {error} ({code})" if code else f"error: {error}")
    return result


def test_bad_input_is_one_clear_error(world: World) -> None:
    site = world.site()
    world.daemon(site, "d1")
    push(site, example(site, "dev"))

    missing = site.home / "nowhere"
    assert_cli_error(
        site.cli("template", "push", str(missing), "--provisioner", "echo"),
        f"{missing} is not a directory",
    )
    assert_cli_error(
        site.cli("provisioner", "--provisioner", "nope", "--id", "x"), "unknown provisioner nope"
    )
    assert_cli_error(
        site.cli("workspace", "create", "box", "--template", "nope"), "NOT_FOUND", "nope"
    )
    line = assert_cli_error(
        site.cli("workspace", "create", "box", "-t", "dev", "--param", "nope=1"),
        "INVALID_ARGUMENT",
    )
    assert "'nope'" in line
    assert_cli_error(
        site.cli("workspace", "create", "box", "-t", "dev", "--param", "nope"),
        "--param must look like KEY=VALUE, got 'nope'",
    )
    assert "no workspaces" in site.ok("workspace", "list").stderr

    site.ok("workspace", "create", "box", "-t", "dev")
    assert_cli_error(site.cli("workspace", "create", "box", "-t", "dev"), "ALREADY_EXISTS", "box")
    assert_cli_error(site.cli("workspace", "stop", "nope"), "NOT_FOUND")
    assert_cli_error(site.cli("provisioner", "jobs", "show", "nope"), "NOT_FOUND")
    _, rows = cli_table(site.ok("workspace", "list").stdout)
    assert [row[1] for row in rows] == ["box"]
