"""The terraform provisioner: runs terraform (or OpenTofu) over a template.

Parse reads the template's variables from its `*.tf` files (no binary needed).
Plan runs `init` and `plan -out=terraform.tfplan` in the template directory,
with the previous build's state written to `terraform.tfstate`; apply runs
that saved plan and answers with the new state. Resources come from
`show -json`: every managed resource, with what `coder_metadata` says of it.

Cancel: a set `session.canceled` sends the running command SIGINT (terraform's
graceful stop) and the operation answers "canceled"; cancelling the task
itself kills the command's process group.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import signal
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hcl2

from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.provisioner.base import Session

PLAN_FILE = "terraform.tfplan"
STATE_FILE = "terraform.tfstate"
NO_BINARY = (
    "no terraform or tofu binary found on PATH: install one, or run the daemon with the echo "
    "provisioner"
)
# Seconds a finished command's output may still drain (from children it left).
DRAIN_GRACE = 1.0
PUMP_CHUNK = 65536
# Terraform frames its diagnostics in box-drawing characters.
_FRAME = "│╷╵ \t"


class _Canceled(Exception):
    def __str__(self) -> str:
        return "canceled"


class _Failed(Exception):
    pass


@dataclass
class _Outcome:
    returncode: int
    stdout: bytes
    stderr: list[str] = field(default_factory=list)


class TerraformProvisioner:
    name = "terraform"

    def __init__(self, *, binary: str | None = None) -> None:
        self._binary = binary

    # -- parse ---------------------------------------------------------------

    async def parse(self, session: Session) -> sdk.ParseComplete:
        try:
            variables = await asyncio.to_thread(read_variables, session.directory)
        except _Failed as exc:
            return sdk.ParseComplete(error=str(exc))
        readme = session.directory / "README.md"
        return sdk.ParseComplete(
            template_variables=variables,
            readme=readme.read_bytes() if readme.is_file() else b"",
        )

    # -- plan ----------------------------------------------------------------

    async def plan(self, session: Session, request: sdk.PlanRequest) -> sdk.PlanComplete:
        binary = self._find_binary()
        if binary is None:
            return sdk.PlanComplete(error=NO_BINARY)
        directory = session.directory
        # A plan left from an earlier run must not be applied if this one fails.
        (directory / PLAN_FILE).unlink(missing_ok=True)
        if session.state:
            (directory / STATE_FILE).write_bytes(session.state)
        env = _environment(request.metadata)
        plan_args = ["plan", "-input=false", "-no-color", f"-out={PLAN_FILE}"]
        if request.metadata.workspace_transition == sdk.DESTROY:
            plan_args.append("-destroy")
        for variable in request.variable_values:
            plan_args += ["-var", f"{variable.name}={variable.value}"]
        try:
            await self._step(session, binary, ["init", "-input=false", "-no-color"], env)
            await self._step(session, binary, plan_args, env)
            shown = await self._step(session, binary, ["show", "-json", PLAN_FILE], env, True)
            document = _json(shown, binary)
            planned = document.get("planned_values") or {}
            config = (document.get("configuration") or {}).get("root_module") or {}
            resources = convert_resources(planned.get("root_module") or {}, config)
        except (_Canceled, _Failed) as exc:
            return sdk.PlanComplete(error=str(exc))
        return sdk.PlanComplete(resources=resources, plan=shown)

    # -- apply ---------------------------------------------------------------

    async def apply(self, session: Session, request: sdk.ApplyRequest) -> sdk.ApplyComplete:
        directory = session.directory
        binary = self._find_binary()
        # Before apply runs nothing has changed: the previous state still stands.
        if binary is None:
            return sdk.ApplyComplete(state=session.state, error=NO_BINARY)
        if not (directory / PLAN_FILE).is_file():
            return sdk.ApplyComplete(state=session.state, error="apply needs a plan first")
        env = _environment(request.metadata)
        apply_args = ["apply", "-auto-approve", "-input=false", "-no-color", PLAN_FILE]
        failure: _Canceled | _Failed | None = None
        try:
            await self._step(session, binary, apply_args, env)
        except (_Canceled, _Failed) as exc:
            failure = exc
        # Read also after a failure: a failed or interrupted apply may have made things.
        state_path = directory / STATE_FILE
        state = state_path.read_bytes() if state_path.is_file() else b""
        if failure is not None:
            return sdk.ApplyComplete(state=state, error=str(failure))
        # No local state file: a backend holds it, and plain `show` reads it from there.
        show_args = ["show", "-json", STATE_FILE] if state_path.is_file() else ["show", "-json"]
        try:
            shown = await self._step(session, binary, show_args, env, True)
            values = _json(shown, binary).get("values") or {}
            resources = convert_resources(values.get("root_module") or {})
        except (_Canceled, _Failed) as exc:
            return sdk.ApplyComplete(state=state, error=str(exc))
        return sdk.ApplyComplete(state=state, resources=resources)

    # -- running the binary --------------------------------------------------

    def _find_binary(self) -> str | None:
        if self._binary is not None:
            return self._binary
        return shutil.which("terraform") or shutil.which("tofu")

    async def _step(
        self,
        session: Session,
        binary: str,
        args: list[str],
        env: dict[str, str],
        capture: bool = False,
    ) -> bytes:
        """The command's stdout if capture (else it is logged); _Canceled or _Failed."""
        if session.canceled.is_set():
            raise _Canceled
        try:
            outcome = await run(session, [binary, *args], env, capture=capture)
        except OSError as exc:  # not there, or not executable
            raise _Failed(f"run {binary}: {exc}") from None
        if session.canceled.is_set():
            raise _Canceled
        if outcome.returncode != 0:
            message = f"{_label(binary)} {args[0]} failed: {_status(outcome.returncode)}"
            reason = _reason(outcome.stderr)
            raise _Failed(f"{message}: {reason}" if reason else message)
        return outcome.stdout


class _Protocol(asyncio.subprocess.SubprocessStreamProtocol):
    """Stream pipes, plus an event for the process's exit.

    Process.wait() (3.11) returns only once the pipes close too, which never
    happens while a child left behind holds them.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(limit=PUMP_CHUNK, loop=loop)
        self.exited = asyncio.Event()

    def process_exited(self) -> None:
        super().process_exited()
        self.exited.set()


async def run(
    session: Session, argv: list[str], env: dict[str, str], *, capture: bool = False
) -> _Outcome:
    """Run argv in the session's directory, its lines to the session's log.

    stdout is collected instead of logged when capture is set. A set cancel
    flag sends the process SIGINT and waits on; a cancelled task kills it.
    """
    loop = asyncio.get_running_loop()
    transport, protocol = await loop.subprocess_exec(
        lambda: _Protocol(loop),
        *argv,
        cwd=session.directory,
        env=env,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        start_new_session=True,  # its own process group: our signals reach only it
    )
    assert protocol.stdout is not None and protocol.stderr is not None
    collected = bytearray()
    stderr: list[str] = []

    def log_stderr(line: str) -> None:
        stderr.append(line)
        session.log(sdk.ERROR, line)

    def log_stdout(line: str) -> None:
        session.log(sdk.INFO, line)

    pumps = [
        asyncio.ensure_future(_pump(protocol.stdout, log_stdout, collected if capture else None)),
        asyncio.ensure_future(_pump(protocol.stderr, log_stderr, None)),
    ]
    exited = asyncio.ensure_future(protocol.exited.wait())
    canceled = asyncio.ensure_future(session.canceled.wait())
    try:
        pending: set[asyncio.Future[Any]] = {exited, canceled, *pumps}
        while not exited.done():
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is canceled:
                    with contextlib.suppress(ProcessLookupError):
                        transport.send_signal(signal.SIGINT)
                elif task is not exited:
                    task.result()  # a failing log sink stops the command
        # Children it left behind may hold its output open: drain briefly, then kill them.
        _, still = await asyncio.wait(pumps, timeout=DRAIN_GRACE)
        if still:
            _kill_group(transport.get_pid())
            await asyncio.wait(still, timeout=DRAIN_GRACE)
        for pump in pumps:
            if pump.done():
                pump.result()
    finally:
        canceled.cancel()
        # A forced cancel gets no grace; after an exit, this stops what it left running.
        _kill_group(transport.get_pid())
        if not exited.done():
            await protocol.exited.wait()
        exited.cancel()
        transport.close()  # and the pipes, should a child that left the group still hold them
        for pump in pumps:
            pump.cancel()
    returncode = transport.get_returncode()
    assert returncode is not None
    return _Outcome(returncode, bytes(collected), stderr)


async def _pump(
    stream: asyncio.StreamReader, emit: Callable[[str], None], sink: bytearray | None
) -> None:
    # Chunks, not readline: a line (a JSON document) may be longer than any buffer.
    pending = bytearray()
    while chunk := await stream.read(PUMP_CHUNK):
        if sink is not None:
            sink += chunk
            continue
        scan = len(pending)
        pending += chunk
        start = 0
        while (end := pending.find(b"\n", scan)) != -1:
            emit(_decode(pending[start:end]))
            start = scan = end + 1
        del pending[:start]
    if pending:
        emit(_decode(pending))


def _decode(line: bytes | bytearray) -> str:
    return bytes(line).decode("utf-8", errors="replace").removesuffix("\r")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _status(returncode: int) -> str:
    if returncode >= 0:
        return f"exit status {returncode}"
    try:
        return f"killed by {signal.Signals(-returncode).name}"
    except ValueError:
        return f"killed by signal {-returncode}"


def _label(binary: str) -> str:
    return "tofu" if Path(binary).name.startswith("tofu") else "terraform"


def _reason(stderr: list[str]) -> str:
    """Terraform's first "Error:" line, else the last line with text."""
    lines = [s for s in (line.strip(_FRAME) for line in stderr) if s]
    errors = [line for line in lines if line.startswith("Error:")]
    if errors:
        return errors[0]
    return lines[-1] if lines else ""


def _json(raw: bytes, binary: str) -> dict[str, Any]:
    try:
        document = json.loads(raw)
    except ValueError as exc:
        raise _Failed(f"{_label(binary)} show printed invalid JSON: {exc}") from None
    if not isinstance(document, dict):
        raise _Failed(f"{_label(binary)} show printed JSON that is not an object")
    return document


def _environment(metadata: sdk.Metadata) -> dict[str, str]:
    return {
        **os.environ,
        "CODER_WORKSPACE_TRANSITION": sdk.WorkspaceTransition.Name(
            metadata.workspace_transition
        ).lower(),
        "CODER_WORKSPACE_NAME": metadata.workspace_name,
        "CODER_WORKSPACE_OWNER": metadata.workspace_owner,
        "CODER_WORKSPACE_ID": metadata.workspace_id,
        "CODER_WORKSPACE_BUILD_ID": metadata.workspace_build_id,
        "CODER_TEMPLATE_NAME": metadata.template_name,
        "CODER_TEMPLATE_VERSION": metadata.template_version,
        "TF_IN_AUTOMATION": "1",
    }


# -- variables -----------------------------------------------------------------


def read_variables(directory: Path) -> list[sdk.TemplateVariable]:
    """The variables declared in the directory's *.tf files, by name; _Failed if one is bad."""
    variables: dict[str, sdk.TemplateVariable] = {}
    for path in sorted(directory.glob("*.tf")):
        if not path.is_file():
            continue
        try:
            parsed = _load_hcl(path.read_bytes().decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise _Failed(f"parse {path.name}: not UTF-8 (byte {exc.start})") from None
        except Exception as exc:  # lark raises several kinds; all mean bad syntax
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise _Failed(f"parse {path.name}: {reason}") from None
        for block in parsed.get("variable") or []:
            for name, body in block.items():
                variables[name] = _variable(name, body if isinstance(body, dict) else {})
    return [variables[name] for name in sorted(variables)]


def _load_hcl(text: str) -> dict[str, Any]:
    options = getattr(hcl2, "SerializationOptions", None)
    if options is None:  # python-hcl2 7 unquotes strings and has no options
        loaded: dict[str, Any] = hcl2.loads(text)
        return loaded
    return hcl2.loads(
        text,
        serialization_options=options(
            with_comments=False,
            explicit_blocks=False,
            strip_string_quotes=True,
            preserve_heredocs=False,
            preserve_scientific_notation=False,
        ),
    )


def _variable(name: str, body: dict[str, Any]) -> sdk.TemplateVariable:
    variable = sdk.TemplateVariable(
        name=name,
        description=str(body.get("description") or ""),
        type=_unwrap(str(body.get("type") or "")),
        required="default" not in body,
        sensitive=body.get("sensitive") is True,
    )
    if "default" in body:
        variable.default_value = _default_text(body["default"])
    return variable


def _unwrap(expression: str) -> str:
    if expression.startswith("${") and expression.endswith("}"):
        return expression[2:-1]
    return expression


def _default_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # HCL numbers: 1e3 is 1000
    return json.dumps(value, separators=(",", ":"))


# -- resources -----------------------------------------------------------------


def convert_resources(
    root_module: dict[str, Any], configuration: dict[str, Any] | None = None
) -> list[sdk.Resource]:
    """Resources from a `show -json` module tree (a plan's planned values or a state's values).

    A coder_metadata's resource_id names its resource by id; in a plan the id
    is often unknown yet, so the configuration's reference is used instead.
    """
    found: list[tuple[str, dict[str, Any]]] = []  # (module instance prefix, resource)
    _walk(root_module, "", found)
    managed = {r["address"]: r for _, r in found if r.get("mode") == "managed"}
    references = _config_references(configuration or {}, "")
    by_id: dict[str, str] = {}
    for address, resource in managed.items():
        resource_id = (resource.get("values") or {}).get("id")
        if isinstance(resource_id, str) and resource.get("type") != "coder_metadata":
            by_id.setdefault(resource_id, address)
    out = {
        address: sdk.Resource(name=str(r.get("name", "")), type=str(r.get("type", "")))
        for address, r in managed.items()
        if r.get("type") != "coder_metadata"
    }
    for prefix, resource in found:
        if resource.get("mode") != "managed" or resource.get("type") != "coder_metadata":
            continue
        values = resource.get("values") or {}
        resource_id = values.get("resource_id")
        target = by_id.get(resource_id) if isinstance(resource_id, str) else None
        if target is None:
            config_key = _strip_indexes(prefix) + f"coder_metadata.{resource.get('name')}"
            for reference in references.get(config_key, []):
                if prefix + reference in out:
                    target = prefix + reference
                    break
        if target is None:
            continue
        _apply_metadata(out[target], values)
    return [out[address] for address in sorted(out)]


def _walk(module: dict[str, Any], prefix: str, found: list[tuple[str, dict[str, Any]]]) -> None:
    for resource in module.get("resources") or []:
        if isinstance(resource, dict) and "address" in resource:
            found.append((prefix, resource))
    for child in module.get("child_modules") or []:
        if isinstance(child, dict):
            _walk(child, f"{child.get('address', '')}.", found)


def _config_references(module: dict[str, Any], prefix: str) -> dict[str, list[str]]:
    """coder_metadata config address (module path + address) -> what resource_id refers to."""
    references: dict[str, list[str]] = {}
    for resource in module.get("resources") or []:
        if resource.get("type") != "coder_metadata":
            continue
        expression = (resource.get("expressions") or {}).get("resource_id") or {}
        references[prefix + str(resource.get("address"))] = list(expression.get("references") or [])
    for name, call in (module.get("module_calls") or {}).items():
        child = (call or {}).get("module") or {}
        references.update(_config_references(child, f"{prefix}module.{name}."))
    return references


def _strip_indexes(address: str) -> str:
    return re.sub(r"\[[^\]]*\]", "", address)


def _apply_metadata(resource: sdk.Resource, values: dict[str, Any]) -> None:
    if values.get("daily_cost") is not None:
        resource.daily_cost = int(values["daily_cost"])
    if values.get("hide") is not None:
        resource.hide = bool(values["hide"])
    if values.get("icon"):
        resource.icon = str(values["icon"])
    for item in values.get("item") or []:
        value = item.get("value")
        resource.metadata.append(
            sdk.Resource.Metadata(
                key=str(item.get("key", "")),
                value="" if value is None else str(value),
                sensitive=bool(item.get("sensitive")),
                is_null=bool(item.get("is_null")) or value is None,
            )
        )
