"""Templates and workspaces as a new user meets them: waits that say why and for how
long, Ctrl-C that says what goes on, and --json that scripts can read.

As in test_provisioning_cli.py, every command is `python -m waystation.cli.main ...`
in a child process against `waystation server run` (a child process, --dev), with
a real `waystation provisioner` daemon taking the jobs. One server and one echo
daemon serve the whole module; each test uses templates and workspaces of its own.
"""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from waystation import testing as t
from waystation.protocol.waystation.v1 import provisioning_pb2 as pv
from waystation.protocol.waystation.v1 import provisioning_pb2_grpc as pv_grpc
from waystation.testing import show

Job = pv.ProvisionerJob
Result = subprocess.CompletedProcess[str]
DAEMON = "ux-daemon"
STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z")  # RFC 3339, UTC

pytestmark = pytest.mark.timeout(300)


class Site:
    def __init__(self, server: t.ServerProcess, home: Path) -> None:
        self.server = server
        self.home = home

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("WAYSTATION_")}
        for noise in ("FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE", "LINES", "NO_COLOR"):
            env.pop(noise, None)
        env["WAYSTATION_ADDR"] = self.server.address
        env["WAYSTATION_CONFIG"] = str(self.home / "contexts.json")
        env["WAYSTATION_USER"] = "alice"
        env["COLUMNS"] = "200"
        return env

    def argv(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "waystation.cli.main", *args]

    def cli(self, *args: str) -> Result:
        return subprocess.run(
            self.argv(*args),
            env=self.env(),
            cwd=self.home,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    def ok(self, *args: str) -> Result:
        result = self.cli(*args)
        assert result.returncode == 0, show(result)
        assert "Traceback" not in result.stderr + result.stdout, show(result)
        return result

    def job(self, job_id: str) -> Job:
        channel = self.server.connection().channel()
        try:
            request = pv.GetProvisionerJobRequest(id=job_id)
            return pv_grpc.ProvisioningStub(channel).GetProvisionerJob(request, timeout=10)
        finally:
            channel.close()

    def interrupted(self, until: Callable[[str], bool], *args: str) -> tuple[int, str]:
        """Run on a pseudo-terminal until the screen satisfies `until`, then Ctrl-C
        (SIGINT): the exit status and the screen, escape sequences removed."""
        primary, secondary = os.openpty()
        shown = bytearray()

        def screen() -> str:
            return re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", shown.decode(errors="replace"))

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
                self.argv(*args), env=self.env(), cwd=self.home, stdout=secondary, stderr=secondary
            ) as proc:
                os.close(secondary)
                secondary = -1
                reader.start()
                deadline = time.monotonic() + 60
                while not until(screen()):
                    assert proc.poll() is None, f"exited {proc.returncode}:\n{screen()}"
                    assert time.monotonic() < deadline, screen()
                    time.sleep(0.1)
                proc.send_signal(signal.SIGINT)
                status = proc.wait(timeout=30)
            reader.join(10)
        finally:
            if secondary != -1:
                os.close(secondary)
            os.close(primary)
        return status, screen()


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    home = tmp_path_factory.mktemp("ux")
    server = t.ServerProcess(home / "data")
    server.start()
    found = Site(server, home)
    log = home / "daemon.log"
    argv = found.argv("provisioner", "--provisioner", "echo", "--id", DAEMON)
    with log.open("ab") as out:
        daemon = subprocess.Popen(argv, env=found.env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        channel = server.connection().channel()
        stub = pv_grpc.ProvisioningStub(channel)
        deadline = time.monotonic() + 60
        request = pv.ListProvisionerDaemonsRequest()
        while not any(
            d.id == DAEMON and d.online for d in stub.ListProvisionerDaemons(request).daemons
        ):
            assert daemon.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        channel.close()
        yield found
    finally:
        daemon.send_signal(signal.SIGTERM)
        try:
            daemon.wait(30)
        except subprocess.TimeoutExpired:
            daemon.kill()
            daemon.wait(30)
        assert server.stop() == 0, server.output()


def example(site: Site, name: str) -> Path:
    directory = site.home / name
    site.ok("template", "init", str(directory))
    return directory


def held(site: Site, name: str) -> Path:
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


def import_job(result: Result) -> str:
    found = re.search(r"import job (\w{26})", result.stderr)
    assert found, show(result)
    return found.group(1)


def test_push_to_a_provisioner_no_daemon_ever_served_warns_at_once(site: Site) -> None:
    directory = example(site, "typo")
    result = site.ok("template", "push", str(directory), "--provisioner", "nosuch", "--detach")
    warning = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(warning) == 1, show(result)
    assert "no provisioner daemon has ever served 'nosuch'" in warning[0], show(result)
    assert "waystation provisioner --provisioner nosuch" in warning[0], show(result)
    # The job still queues.
    assert site.job(import_job(result)).status == Job.PENDING

    # A provisioner some daemon serves: no warning.
    served = site.ok("template", "push", str(directory), "--provisioner", "echo", "--detach")
    assert "warning" not in served.stderr, show(served)


def test_a_pending_push_shows_how_long_it_waited_and_ctrl_c_says_it_goes_on(
    site: Site,
) -> None:
    directory = example(site, "waits")
    status, screen = site.interrupted(
        lambda shown: "waited 2s" in shown,
        *("template", "push", str(directory), "--provisioner", "nowhere"),
    )
    assert status == 130, screen
    assert "Traceback" not in screen, screen
    assert re.search(r"waited \ds: no connected daemon serves provisioner nowhere", screen)
    found = re.search(r"stopped watching; the import goes on \(cancel it: (.+)\)", screen)
    assert found, screen
    job_id = found.group(1).rsplit(" ", 1)[-1]
    assert found.group(1) == f"waystation provisioner jobs cancel {job_id}", screen
    assert site.job(job_id).status == Job.PENDING


def test_ctrl_c_during_a_workspace_build_says_it_goes_on_and_how_to_cancel(
    site: Site,
) -> None:
    site.ok("template", "push", str(held(site, "held")), "--provisioner", "echo")
    status, screen = site.interrupted(
        lambda shown: f"running on {DAEMON}" in shown,
        *("workspace", "create", "held-ws", "--template", "held"),
    )
    assert status == 130, screen
    assert "Traceback" not in screen, screen
    line = "stopped watching; the build goes on (cancel it: waystation workspace cancel held-ws)"
    assert line in screen, screen
    job_id = re.search(r"build #1 \(start\), job (\w{26})", screen)
    assert job_id, screen
    assert site.job(job_id.group(1)).status == Job.RUNNING
    site.ok("workspace", "cancel", "held-ws")


def test_push_and_create_with_json_print_the_version_and_the_build(site: Site) -> None:
    directory = example(site, "scripted")
    pushed = site.ok("template", "push", str(directory), "--provisioner", "echo", "--json")
    version: dict[str, Any] = json.loads(pushed.stdout)  # nothing else on stdout
    assert version["template_name"] == "scripted", pushed.stdout
    assert version["job"]["status"] == "SUCCEEDED", pushed.stdout
    assert STAMP.fullmatch(version["created_at"]), version
    assert "==> " in pushed.stderr, show(pushed)  # the logs went to stderr

    made = site.ok("workspace", "create", "scripted-ws", "-t", "scripted", "--json")
    build: dict[str, Any] = json.loads(made.stdout)
    # START is the enum's zero: JSON leaves it out, as every default value.
    assert (build["build_number"], build.get("transition", "START")) == (1, "START"), made.stdout
    assert build["job"]["status"] == "SUCCEEDED", made.stdout
    assert STAMP.fullmatch(build["job"]["completed_at"]), build
    assert [r["name"] for r in build["resources"]], build

    detached = site.ok("workspace", "stop", "scripted-ws", "--detach")
    assert detached.stdout == "", show(detached)
