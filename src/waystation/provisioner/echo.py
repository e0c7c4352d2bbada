"""The echo provisioner: answers with responses stored in the template itself.

The archive holds serialized provisioner `Response` messages named
`<i>.<transition>.<op>.protobuf` or `<i>.<op>.protobuf` (op: parse, plan,
apply; transition: start, stop, destroy, or "unspecified" for parse), read
for i = 0, 1, ... until neither exists, the transition-specific name first.
Log responses are replayed as provisioner output; the first Complete of the
operation is the answer. With no Complete, the operation waits for a cancel
(tests use this to hold a job "running"). Upstream Coder's test provisioner
works the same way, so archives made for it work here.
"""

from __future__ import annotations

from pathlib import Path

from google.protobuf.message import DecodeError

from waystation.protocol.provisionersdk.proto import provisioner_pb2 as sdk
from waystation.provisioner.base import Session


class EchoError(Exception):
    pass


def _transition(metadata: sdk.Metadata) -> str:
    return sdk.WorkspaceTransition.Name(metadata.workspace_transition).lower()


def read_responses(directory: Path, transition: str, op: str) -> list[sdk.Response]:
    responses: list[sdk.Response] = []
    index = 0
    while True:
        for name in (f"{index}.{transition}.{op}.protobuf", f"{index}.{op}.protobuf"):
            path = directory / name
            if path.is_file():
                break
        else:
            if index == 0:
                raise EchoError(f"no state: no {index}.{op}.protobuf in the template")
            return responses
        try:
            responses.append(sdk.Response.FromString(path.read_bytes()))
        except DecodeError as exc:
            raise EchoError(f"unmarshal {name}: {exc}") from None
        index += 1


class EchoProvisioner:
    name = "echo"

    async def _replay(
        self, session: Session, transition: str, op: str
    ) -> sdk.ParseComplete | sdk.PlanComplete | sdk.ApplyComplete | str:
        """The operation's Complete, after replaying its logs; or an error message."""
        try:
            responses = read_responses(session.directory, transition, op)
        except EchoError as exc:
            return str(exc)
        for response in responses:
            which = response.WhichOneof("type")
            if which == "log":
                session.log(response.log.level, response.log.output)
            elif which == op:
                complete: sdk.ParseComplete | sdk.PlanComplete | sdk.ApplyComplete = getattr(
                    response, op
                )
                return complete
        await session.canceled.wait()
        return "canceled"

    async def parse(self, session: Session) -> sdk.ParseComplete:
        answer = await self._replay(session, "unspecified", "parse")
        if isinstance(answer, str):
            return sdk.ParseComplete(error=answer)
        assert isinstance(answer, sdk.ParseComplete)
        return answer

    async def plan(self, session: Session, request: sdk.PlanRequest) -> sdk.PlanComplete:
        answer = await self._replay(session, _transition(request.metadata), "plan")
        if isinstance(answer, str):
            return sdk.PlanComplete(error=answer)
        assert isinstance(answer, sdk.PlanComplete)
        return answer

    async def apply(self, session: Session, request: sdk.ApplyRequest) -> sdk.ApplyComplete:
        answer = await self._replay(session, _transition(request.metadata), "apply")
        if isinstance(answer, str):
            return sdk.ApplyComplete(error=answer)
        assert isinstance(answer, sdk.ApplyComplete)
        return answer


def tar(
    parse: list[sdk.Response] | None = None,
    plan: list[sdk.Response] | None = None,
    apply: list[sdk.Response] | None = None,
    by_transition: dict[str, dict[str, list[sdk.Response]]] | None = None,
    extra: dict[str, bytes] | None = None,
) -> bytes:
    """An echo template archive (for tests, the bench and examples).

    `by_transition` maps "start"/"stop"/"destroy" to {"plan": [...], "apply": [...]}.
    Defaults: an empty parse, plan and apply complete.
    """
    import io
    import tarfile

    files: dict[str, bytes] = {}
    groups = {
        "parse": parse if parse is not None else [sdk.Response(parse=sdk.ParseComplete())],
        "plan": plan if plan is not None else [sdk.Response(plan=sdk.PlanComplete())],
        "apply": apply if apply is not None else [sdk.Response(apply=sdk.ApplyComplete())],
    }
    for op, responses in groups.items():
        for i, response in enumerate(responses):
            files[f"{i}.{op}.protobuf"] = response.SerializeToString()
    for transition, ops in (by_transition or {}).items():
        for op, responses in ops.items():
            for i, response in enumerate(responses):
                files[f"{i}.{transition}.{op}.protobuf"] = response.SerializeToString()
    files.update(extra or {})
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def example(directory: Path) -> list[str]:
    """Write a small echo template into `directory` (for `waystation template init`):
    a variable, a parameter, a machine that costs 1 a day, and logs and state
    that differ by transition. Returns the file names written."""
    machine = sdk.Resource(name="dev", type="echo_machine", daily_cost=1)
    size = sdk.RichParameter(
        name="size",
        type="string",
        default_value="small",
        mutable=True,
        options=[
            sdk.RichParameterOption(name="Small", value="small"),
            sdk.RichParameterOption(name="Large", value="large"),
        ],
    )
    greeting = sdk.TemplateVariable(name="greeting", type="string", default_value="hello")

    def log(text: str) -> sdk.Response:
        return sdk.Response(log=sdk.Log(level=sdk.INFO, output=text))

    files: dict[str, list[sdk.Response]] = {
        "parse": [sdk.Response(parse=sdk.ParseComplete(template_variables=[greeting]))],
        "plan": [
            log("planning a dev machine"),
            sdk.Response(plan=sdk.PlanComplete(resources=[machine], parameters=[size])),
        ],
        "start.apply": [
            log("creating the dev machine"),
            log("the dev machine is running"),
            sdk.Response(apply=sdk.ApplyComplete(state=b'{"dev": "running"}', resources=[machine])),
        ],
        "stop.apply": [
            log("stopping the dev machine"),
            sdk.Response(apply=sdk.ApplyComplete(state=b'{"dev": "stopped"}', resources=[machine])),
        ],
        "destroy.apply": [
            log("destroying the dev machine"),
            sdk.Response(apply=sdk.ApplyComplete(state=b"")),
        ],
    }
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for op, responses in files.items():
        for i, response in enumerate(responses):
            name = f"{i}.{op}.protobuf"
            (directory / name).write_bytes(response.SerializeToString())
            written.append(name)
    (directory / "README.md").write_text(
        "# An echo template\n\nServed by `waystation provisioner --provisioner echo`.\n"
    )
    return [*written, "README.md"]
