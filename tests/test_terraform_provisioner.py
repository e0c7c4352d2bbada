"""The terraform provisioner against a fake terraform binary (and a real one, when installed).

The fake is a Python script that records each call (argv, cwd, CODER_/TF_
environment, the state file it saw) to calls.jsonl and behaves as the FAKE_TF_*
environment variables say; `show -json` prints show-plan.json or
show-state.json from its control directory.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import stat
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.provisioner.base import Session
from waystation.provisioner.terraform import TerraformProvisioner

FAKE = r"""
import json, os, signal, subprocess, sys, time

sys.stdout.reconfigure(line_buffering=True)
sys.stderr.reconfigure(line_buffering=True)
args = sys.argv[1:]
sub = args[0]
control = os.environ["FAKE_TF_DIR"]
state = open("terraform.tfstate").read() if os.path.exists("terraform.tfstate") else None
record = {
    "argv": [os.path.basename(sys.argv[0]), *args],
    "cwd": os.getcwd(),
    "env": {k: v for k, v in os.environ.items() if k.startswith(("CODER_", "TF_"))},
    "state": state,
}
with open(os.path.join(control, "calls.jsonl"), "a") as f:
    f.write(json.dumps(record) + "\n")

if sub == "show":
    name = "show-plan.json" if args[-1].endswith(".tfplan") else "show-state.json"
    sys.stdout.write(open(os.path.join(control, name)).read())
    sys.exit(0)

if os.environ.get("FAKE_TF_HANG") == sub:
    if os.environ.get("FAKE_TF_IGNORE_INT"):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    else:
        def interrupted(*_):
            print("interrupted")
            sys.exit(1)
        signal.signal(signal.SIGINT, interrupted)
    with open(os.path.join(control, "pid.tmp"), "w") as f:
        f.write(str(os.getpid()))
    os.rename(os.path.join(control, "pid.tmp"), os.path.join(control, "pid"))
    while True:
        time.sleep(0.1)

print(f"{sub}: working")
if os.environ.get("FAKE_TF_LONG") == sub:
    print("x" * 200_000)
print(f"{sub}: a warning", file=sys.stderr)
if os.environ.get("FAKE_TF_ORPHAN") == sub:
    # A child that keeps our stdout open after we exit.
    child_pid = os.path.join(control, "child-pid")
    code = f"import os, time; open({child_pid!r}, 'w').write(str(os.getpid())); time.sleep(300)"
    subprocess.Popen([sys.executable, "-c", code])
    while not os.path.exists(child_pid) or not open(child_pid).read():
        time.sleep(0.05)
if sub == "plan":
    open("terraform.tfplan", "w").write("a plan")
if sub == "apply":
    open("terraform.tfstate", "w").write(os.environ.get("FAKE_TF_NEW_STATE", '{"serial": 2}'))
if os.environ.get("FAKE_TF_FAIL") == sub:
    # Terraform frames a diagnostic in box-drawing characters.
    diagnostic = ["\u2577", "\u2502 Error: Invalid reference", "\u2502 ", "\u2575"]
    for line in diagnostic:
        print(line, file=sys.stderr)
    sys.exit(3)
print(f"{sub}: done")
"""

VARIABLES_TF = """
variable "name" {
  type        = string
  description = "The workspace's name"
}

variable "size" {
  type    = number
  default = 5
}

variable "debug" {
  type    = bool
  default = false
}

variable "token" {
  type      = string
  default   = "abc"
  sensitive = true
}

variable "untyped" {}

resource "terraform_data" "x" {
  input = var.name
}
"""

MORE_TF = """
# Variables may live in any .tf file.
variable "zones" {
  type    = list(string)
  default = ["a", "b"]
}

variable "labels" {
  type    = map(string)
  default = { team = "infra" }
}
"""


def _module() -> dict[str, Any]:
    """A module tree as `show -json` prints it, in a plan's planned values or a state's values."""
    metadata = {
        "resource_id": "id-a",
        "daily_cost": 7,
        "hide": True,
        "icon": "/icon/docker.svg",
        "item": [
            {"key": "image", "value": "ubuntu", "sensitive": False, "is_null": False},
            {"key": "password", "value": "hunter2", "sensitive": True, "is_null": False},
            {"key": "nothing", "value": None, "sensitive": False, "is_null": True},
        ],
    }
    return {
        "resources": [
            _resource("terraform_data.b", "terraform_data", "b", {"id": "id-b"}),
            _resource("docker_container.a", "docker_container", "a", {"id": "id-a"}),
            _resource("coder_metadata.a", "coder_metadata", "a", metadata),
            {**_resource("data.coder_workspace.me", "coder_workspace", "me", {"id": "w"})}
            | {"mode": "data"},
        ],
        "child_modules": [
            {
                "address": "module.disk",
                "resources": [
                    _resource(
                        "module.disk.terraform_data.volume", "terraform_data", "volume", {"id": "v"}
                    )
                ],
            }
        ],
    }


def _resource(address: str, type_: str, name: str, values: dict[str, Any]) -> dict[str, Any]:
    return {"address": address, "mode": "managed", "type": type_, "name": name, "values": values}


class Fake:
    """The fake binary's control directory and what it recorded."""

    def __init__(self, root: Path, monkeypatch: pytest.MonkeyPatch, name: str = "terraform"):
        self.control = root / "control"
        self.control.mkdir()
        self.bin = root / "bin"
        self.bin.mkdir()
        script = self.bin / name
        script.write_text(f"#!{sys.executable}\n{FAKE}")
        script.chmod(script.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
        monkeypatch.setenv("PATH", str(self.bin))  # nothing else: no real terraform either
        monkeypatch.setenv("FAKE_TF_DIR", str(self.control))
        self.show(plan={"planned_values": {"root_module": _module()}})
        self.show(state={"values": {"root_module": _module()}})

    def show(self, plan: Any = None, state: Any = None) -> None:
        if plan is not None:
            (self.control / "show-plan.json").write_text(json.dumps(plan))
        if state is not None:
            (self.control / "show-state.json").write_text(json.dumps(state))

    def calls(self) -> list[dict[str, Any]]:
        path = self.control / "calls.jsonl"
        if not path.exists():
            return []
        return [json.loads(line) for line in path.read_text().splitlines()]

    def argvs(self) -> list[list[str]]:
        return [call["argv"] for call in self.calls()]

    async def pid(self, name: str = "pid") -> int:
        path = self.control / name
        for _ in range(2400):  # generous: the machine may be slow
            if path.exists() and path.read_text():
                return int(path.read_text())
            await asyncio.sleep(0.05)
        raise AssertionError(f"the fake never wrote {name}")


Logs = list[tuple[int, str]]


def _session(directory: Path, state: bytes = b"") -> tuple[Session, Logs]:
    directory.mkdir(exist_ok=True)
    logs: Logs = []

    def log(level: sdk.LogLevel.ValueType, line: str) -> None:
        logs.append((int(level), line))

    return Session(directory=directory, state=state, log=log), logs


def _metadata(transition: sdk.WorkspaceTransition.ValueType = sdk.START) -> sdk.Metadata:
    return sdk.Metadata(
        workspace_transition=transition,
        workspace_name="dev",
        workspace_owner="alice",
        workspace_id="ws-1",
        workspace_build_id="build-1",
        template_name="docker",
        template_version="v1",
    )


def _plan_request(transition: sdk.WorkspaceTransition.ValueType = sdk.START) -> sdk.PlanRequest:
    return sdk.PlanRequest(
        metadata=_metadata(transition),
        variable_values=[
            sdk.VariableValue(name="name", value="box"),
            sdk.VariableValue(name="size", value="2 GB", sensitive=True),
        ],
    )


def _apply_request() -> sdk.ApplyRequest:
    return sdk.ApplyRequest(metadata=_metadata())


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:  # a zombie no one has reaped yet is gone too
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


async def _until(check: Callable[[], bool]) -> bool:
    for _ in range(1200):
        if check():
            return True
        await asyncio.sleep(0.05)
    return check()


# -- parse -------------------------------------------------------------------


async def test_parse_reads_variables_from_every_tf_file_and_the_readme(tmp_path: Path) -> None:
    session, _ = _session(tmp_path / "tpl")
    (session.directory / "main.tf").write_text(VARIABLES_TF)
    (session.directory / "more.tf").write_text(MORE_TF)
    (session.directory / "notes.txt").write_text('variable "ignored" {}')
    (session.directory / "README.md").write_bytes(b"# Docker\n")

    parsed = await TerraformProvisioner().parse(session)

    assert parsed.error == ""
    assert parsed.readme == b"# Docker\n"
    by_name = {v.name: v for v in parsed.template_variables}
    assert [v.name for v in parsed.template_variables] == sorted(by_name)
    assert set(by_name) == {"name", "size", "debug", "token", "untyped", "zones", "labels"}
    assert by_name["name"] == sdk.TemplateVariable(
        name="name", description="The workspace's name", type="string", required=True
    )
    assert by_name["size"] == sdk.TemplateVariable(name="size", type="number", default_value="5")
    assert by_name["debug"] == sdk.TemplateVariable(
        name="debug", type="bool", default_value="false"
    )
    assert by_name["token"] == sdk.TemplateVariable(
        name="token", type="string", default_value="abc", sensitive=True
    )
    assert by_name["untyped"] == sdk.TemplateVariable(name="untyped", required=True)
    assert by_name["zones"].type == "list(string)"
    assert json.loads(by_name["zones"].default_value) == ["a", "b"]
    assert by_name["labels"].type == "map(string)"
    assert json.loads(by_name["labels"].default_value) == {"team": "infra"}


async def test_parse_without_readme_or_variables(tmp_path: Path) -> None:
    session, _ = _session(tmp_path / "tpl")
    (session.directory / "main.tf").write_text('resource "terraform_data" "x" {}\n')

    parsed = await TerraformProvisioner().parse(session)

    assert parsed == sdk.ParseComplete()


async def test_parse_names_the_file_hcl_cannot_parse(tmp_path: Path) -> None:
    session, _ = _session(tmp_path / "tpl")
    (session.directory / "good.tf").write_text(VARIABLES_TF)
    (session.directory / "broken.tf").write_text('variable "x" {\n')

    parsed = await TerraformProvisioner().parse(session)

    assert parsed.error.startswith("parse broken.tf: ")
    assert len(parsed.error) > len("parse broken.tf: ")
    assert not parsed.template_variables


async def test_parse_needs_no_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    session, _ = _session(tmp_path / "tpl")
    (session.directory / "main.tf").write_text(VARIABLES_TF)

    parsed = await TerraformProvisioner().parse(session)

    assert parsed.error == ""
    assert len(parsed.template_variables) == 5


# -- plan --------------------------------------------------------------------


async def test_plan_runs_init_plan_and_show(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = Fake(tmp_path, monkeypatch)
    session, logs = _session(tmp_path / "tpl", state=b'{"serial": 1}')

    planned = await TerraformProvisioner().plan(session, _plan_request())

    assert planned.error == ""
    expected_env = {
        "CODER_WORKSPACE_TRANSITION": "start",
        "CODER_WORKSPACE_NAME": "dev",
        "CODER_WORKSPACE_OWNER": "alice",
        "CODER_WORKSPACE_ID": "ws-1",
        "CODER_WORKSPACE_BUILD_ID": "build-1",
        "CODER_TEMPLATE_NAME": "docker",
        "CODER_TEMPLATE_VERSION": "v1",
        "TF_IN_AUTOMATION": "1",
    }
    assert fake.argvs() == [
        ["terraform", "init", "-input=false", "-no-color"],
        [
            "terraform",
            "plan",
            "-input=false",
            "-no-color",
            "-out=terraform.tfplan",
            "-var",
            "name=box",
            "-var",
            "size=2 GB",
        ],
        ["terraform", "show", "-json", "terraform.tfplan"],
    ]
    for call in fake.calls():
        assert Path(call["cwd"]).resolve() == session.directory.resolve()
        # The previous build's state is in place before anything runs.
        assert call["state"] == '{"serial": 1}'
        assert call["env"] | expected_env == call["env"]
    assert json.loads(planned.plan) == {"planned_values": {"root_module": _module()}}
    assert (sdk.INFO, "init: working") in logs
    assert (sdk.ERROR, "init: a warning") in logs
    assert (sdk.INFO, "plan: done") in logs
    assert not any(line.startswith("{") for _, line in logs), "show's JSON is data, not logs"


async def test_plan_for_destroy_adds_destroy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = Fake(tmp_path, monkeypatch)
    session, _ = _session(tmp_path / "tpl")

    planned = await TerraformProvisioner().plan(session, _plan_request(sdk.DESTROY))

    assert planned.error == ""
    plan_argv = fake.argvs()[1]
    assert plan_argv[:6] == [
        "terraform",
        "plan",
        "-input=false",
        "-no-color",
        "-out=terraform.tfplan",
        "-destroy",
    ]
    assert plan_argv[6:] == ["-var", "name=box", "-var", "size=2 GB"]
    assert all(c["env"]["CODER_WORKSPACE_TRANSITION"] == "destroy" for c in fake.calls())
    # A first build has no state to write.
    assert all(c["state"] is None for c in fake.calls())


async def test_plan_resources_with_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Fake(tmp_path, monkeypatch)
    session, _ = _session(tmp_path / "tpl")

    planned = await TerraformProvisioner().plan(session, _plan_request())

    assert planned.error == ""
    assert [(r.type, r.name) for r in planned.resources] == [
        ("docker_container", "a"),
        ("terraform_data", "volume"),  # module.disk.terraform_data.volume
        ("terraform_data", "b"),
    ]
    container = planned.resources[0]
    assert container.daily_cost == 7
    assert container.hide is True
    assert container.icon == "/icon/docker.svg"
    assert list(container.metadata) == [
        sdk.Resource.Metadata(key="image", value="ubuntu"),
        sdk.Resource.Metadata(key="password", value="hunter2", sensitive=True),
        sdk.Resource.Metadata(key="nothing", is_null=True),
    ]
    assert planned.resources[2] == sdk.Resource(name="b", type="terraform_data")


async def test_plan_metadata_follows_the_configuration_while_ids_are_unknown(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = Fake(tmp_path, monkeypatch)
    # In a plan, ids not yet made are unknown, so absent from the planned values.
    fake.show(
        plan={
            "planned_values": {
                "root_module": {
                    "resources": [
                        _resource("docker_container.a", "docker_container", "a", {}),
                        _resource("coder_metadata.a", "coder_metadata", "a", {"daily_cost": 3}),
                    ],
                    "child_modules": [
                        {
                            "address": "module.disk[0]",
                            "resources": [
                                _resource(
                                    "module.disk[0].terraform_data.v", "terraform_data", "v", {}
                                ),
                                _resource(
                                    "module.disk[0].coder_metadata.v",
                                    "coder_metadata",
                                    "v",
                                    {"daily_cost": 4},
                                ),
                            ],
                        }
                    ],
                }
            },
            "configuration": {
                "root_module": {
                    "resources": [
                        {
                            "address": "coder_metadata.a",
                            "type": "coder_metadata",
                            "expressions": {
                                "resource_id": {
                                    "references": ["docker_container.a.id", "docker_container.a"]
                                }
                            },
                        }
                    ],
                    "module_calls": {
                        "disk": {
                            "module": {
                                "resources": [
                                    {
                                        "address": "coder_metadata.v",
                                        "type": "coder_metadata",
                                        "expressions": {
                                            "resource_id": {
                                                "references": [
                                                    "terraform_data.v.id",
                                                    "terraform_data.v",
                                                ]
                                            }
                                        },
                                    }
                                ]
                            }
                        }
                    },
                }
            },
        }
    )
    session, _ = _session(tmp_path / "tpl")

    planned = await TerraformProvisioner().plan(session, _plan_request())

    assert planned.error == ""
    assert [(r.name, r.daily_cost) for r in planned.resources] == [("a", 3), ("v", 4)]


async def test_plan_reads_a_megabyte_of_json_and_long_log_lines(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = Fake(tmp_path, monkeypatch)
    fake.show(plan={"planned_values": {"root_module": _module()}, "padding": "y" * 1_000_000})
    monkeypatch.setenv("FAKE_TF_LONG", "init")
    session, logs = _session(tmp_path / "tpl")

    planned = await TerraformProvisioner().plan(session, _plan_request())

    assert planned.error == ""
    assert len(planned.resources) == 3
    assert (sdk.INFO, "x" * 200_000) in logs
    assert logs.index((sdk.INFO, "x" * 200_000)) == logs.index((sdk.INFO, "init: working")) + 1


async def test_plan_reports_a_failed_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake(tmp_path, monkeypatch)
    monkeypatch.setenv("FAKE_TF_FAIL", "init")
    session, logs = _session(tmp_path / "tpl")

    planned = await TerraformProvisioner().plan(session, _plan_request())

    assert planned.error == "terraform init failed: exit status 3: Error: Invalid reference"
    assert not planned.resources
    assert [argv[1] for argv in fake.argvs()] == ["init"]
    assert (sdk.ERROR, "│ Error: Invalid reference") in logs


async def test_plan_reports_invalid_show_output(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = Fake(tmp_path, monkeypatch)
    (fake.control / "show-plan.json").write_text("not json")
    session, _ = _session(tmp_path / "tpl")

    planned = await TerraformProvisioner().plan(session, _plan_request())

    assert planned.error.startswith("terraform show printed invalid JSON")


async def test_plan_without_a_binary(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    session, _ = _session(tmp_path / "tpl")
    provisioner = TerraformProvisioner()

    planned = await provisioner.plan(session, _plan_request())
    (session.directory / "terraform.tfplan").write_text("a plan")
    applied = await provisioner.apply(session, _apply_request())

    assert "no terraform or tofu binary found on PATH" in planned.error
    assert "no terraform or tofu binary found on PATH" in applied.error


async def test_plan_uses_tofu_when_terraform_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = Fake(tmp_path, monkeypatch, name="tofu")
    session, _ = _session(tmp_path / "tpl")

    planned = await TerraformProvisioner().plan(session, _plan_request())

    assert planned.error == ""
    assert [argv[0] for argv in fake.argvs()] == ["tofu", "tofu", "tofu"]


async def test_an_explicit_binary_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake(tmp_path, monkeypatch, name="my-terraform")
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    session, _ = _session(tmp_path / "tpl")
    provisioner = TerraformProvisioner(binary=str(fake.bin / "my-terraform"))

    planned = await provisioner.plan(session, _plan_request())

    assert planned.error == ""
    assert len(fake.argvs()) == 3


# -- apply -------------------------------------------------------------------


async def test_apply_runs_the_plan_and_returns_state_and_resources(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = Fake(tmp_path, monkeypatch)
    session, logs = _session(tmp_path / "tpl", state=b'{"serial": 1}')
    provisioner = TerraformProvisioner()
    assert (await provisioner.plan(session, _plan_request())).error == ""

    applied = await provisioner.apply(session, _apply_request())

    assert applied.error == ""
    assert applied.state == b'{"serial": 2}'
    assert fake.argvs()[3:] == [
        ["terraform", "apply", "-auto-approve", "-input=false", "-no-color", "terraform.tfplan"],
        ["terraform", "show", "-json", "terraform.tfstate"],
    ]
    assert fake.calls()[3]["env"]["CODER_WORKSPACE_NAME"] == "dev"
    assert [(r.type, r.name) for r in applied.resources] == [
        ("docker_container", "a"),
        ("terraform_data", "volume"),
        ("terraform_data", "b"),
    ]
    assert applied.resources[0].daily_cost == 7
    assert (sdk.INFO, "apply: done") in logs


async def test_apply_needs_a_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake(tmp_path, monkeypatch)
    session, _ = _session(tmp_path / "tpl", state=b"old")

    applied = await TerraformProvisioner().apply(session, _apply_request())

    assert applied.error == "apply needs a plan first"
    assert applied.state == b"old"
    assert fake.argvs() == []


async def test_a_failed_plan_leaves_no_plan_to_apply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    Fake(tmp_path, monkeypatch)
    session, _ = _session(tmp_path / "tpl")
    (session.directory / "terraform.tfplan").write_text("an old plan")
    monkeypatch.setenv("FAKE_TF_FAIL", "init")
    provisioner = TerraformProvisioner()

    assert (await provisioner.plan(session, _plan_request())).error != ""
    applied = await provisioner.apply(session, _apply_request())

    assert applied.error == "apply needs a plan first"


async def test_a_failed_apply_returns_partial_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = Fake(tmp_path, monkeypatch)
    session, _ = _session(tmp_path / "tpl")
    provisioner = TerraformProvisioner()
    assert (await provisioner.plan(session, _plan_request())).error == ""
    monkeypatch.setenv("FAKE_TF_FAIL", "apply")
    monkeypatch.setenv("FAKE_TF_NEW_STATE", '{"partial": true}')

    applied = await provisioner.apply(session, _apply_request())

    assert applied.error == "terraform apply failed: exit status 3: Error: Invalid reference"
    assert applied.state == b'{"partial": true}'
    assert fake.argvs()[-1][1] == "apply"  # no show after a failure


# -- cancel ------------------------------------------------------------------


async def test_cancel_interrupts_the_running_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = Fake(tmp_path, monkeypatch)
    monkeypatch.setenv("FAKE_TF_HANG", "plan")
    session, logs = _session(tmp_path / "tpl")

    task = asyncio.create_task(TerraformProvisioner().plan(session, _plan_request()))
    pid = await fake.pid()
    session.canceled.set()
    planned = await asyncio.wait_for(task, timeout=60)

    assert planned.error == "canceled"
    assert (sdk.INFO, "interrupted") in logs  # the fake's SIGINT handler ran
    assert [argv[1] for argv in fake.argvs()] == ["init", "plan"]
    assert _gone(pid)


async def test_cancel_before_anything_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = Fake(tmp_path, monkeypatch)
    session, _ = _session(tmp_path / "tpl")
    session.canceled.set()

    planned = await TerraformProvisioner().plan(session, _plan_request())

    assert planned.error == "canceled"
    assert fake.argvs() == []


async def test_a_forced_cancel_kills_a_command_that_ignores_sigint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = Fake(tmp_path, monkeypatch)
    monkeypatch.setenv("FAKE_TF_HANG", "apply")
    monkeypatch.setenv("FAKE_TF_IGNORE_INT", "1")
    session, _ = _session(tmp_path / "tpl")
    (session.directory / "terraform.tfplan").write_text("a plan")

    task = asyncio.create_task(TerraformProvisioner().apply(session, _apply_request()))
    pid = await fake.pid()
    session.canceled.set()
    await asyncio.sleep(0.5)
    assert not task.done(), "SIGINT is ignored: the apply waits on"
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, timeout=60)

    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


async def test_children_left_holding_the_output_are_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = Fake(tmp_path, monkeypatch)
    monkeypatch.setenv("FAKE_TF_ORPHAN", "init")
    session, _ = _session(tmp_path / "tpl")

    planned = await asyncio.wait_for(
        TerraformProvisioner().plan(session, _plan_request()), timeout=100
    )

    assert planned.error == ""
    child = await fake.pid("child-pid")
    assert await _until(lambda: _gone(child))


# -- a real binary -------------------------------------------------------------


@pytest.mark.skipif(
    shutil.which("terraform") is None and shutil.which("tofu") is None,
    reason="needs terraform or tofu on PATH",
)
@pytest.mark.timeout(600)
async def test_a_real_binary_plans_and_applies(tmp_path: Path) -> None:
    session, logs = _session(tmp_path / "tpl")
    # terraform_data is built in: no provider to download.
    (session.directory / "main.tf").write_text(
        'variable "name" {\n  type = string\n}\n\n'
        'resource "terraform_data" "x" {\n  input = var.name\n}\n'
    )
    provisioner = TerraformProvisioner()

    parsed = await provisioner.parse(session)
    request = sdk.PlanRequest(
        metadata=_metadata(), variable_values=[sdk.VariableValue(name="name", value="box")]
    )
    planned = await provisioner.plan(session, request)
    applied = await provisioner.apply(session, _apply_request())

    assert parsed.error == ""
    assert [v.name for v in parsed.template_variables] == ["name"]
    assert planned.error == "", logs
    assert [(r.type, r.name) for r in planned.resources] == [("terraform_data", "x")]
    assert applied.error == "", logs
    assert applied.state
    assert json.loads(applied.state)["resources"]
    assert [(r.type, r.name) for r in applied.resources] == [("terraform_data", "x")]


@pytest.mark.skipif(
    shutil.which("terraform") is None and shutil.which("tofu") is None,
    reason="needs terraform or tofu on PATH",
)
@pytest.mark.timeout(600)
async def test_a_real_binary_stops_on_cancel_and_keeps_partial_state(tmp_path: Path) -> None:
    session, logs = _session(tmp_path / "tpl")
    (session.directory / "main.tf").write_text(
        'resource "terraform_data" "first" {}\n\n'
        'resource "terraform_data" "slow" {\n'
        "  depends_on = [terraform_data.first]\n"
        '  provisioner "local-exec" {\n'
        # The sleep outlives the shell terraform kills: the provisioner must stop it.
        '    command = "sleep 300 & echo $! > sleep.pid; echo slow-started; wait"\n'
        "  }\n}\n"
    )
    provisioner = TerraformProvisioner()
    planned = await provisioner.plan(session, sdk.PlanRequest(metadata=_metadata()))
    assert planned.error == "", logs

    task = asyncio.create_task(provisioner.apply(session, _apply_request()))
    assert await _until(lambda: any("slow-started" in line for _, line in logs))
    session.canceled.set()
    applied = await asyncio.wait_for(task, timeout=300)

    assert applied.error == "canceled"
    addresses = [r["type"] + "." + r["name"] for r in json.loads(applied.state)["resources"]]
    assert "terraform_data.first" in addresses
    sleep_pid = int((session.directory / "sleep.pid").read_text())
    assert await _until(lambda: _gone(sleep_pid))
