"""The wire contract: generated code is fresh, names and numbers are upstream's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf.descriptor import FieldDescriptor

from waystation.protocol import plugin_pb2 as sdk
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.provisionersdk.proto import provisioner_pb2 as prov

ROOT = Path(__file__).resolve().parent.parent
SEEDS = ROOT.parent / "shared" / "seeds"

F = FieldDescriptor


def test_generated_code_is_fresh() -> None:
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "genproto.py"), "--check"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr + "\nrun: python scripts/genproto.py"


@pytest.mark.skipif(not SEEDS.exists(), reason="shared/seeds is not beside the checkout")
def test_vagrant_proto_is_the_seed_unchanged() -> None:
    ours = (ROOT / "proto" / "hashicorp" / "vagrant" / "vagrant_server.proto").read_bytes()
    assert ours == (SEEDS / "vagrant_server.proto").read_bytes()
    restored = (ROOT / "proto" / "provisionerd" / "proto" / "provisionerd.proto").read_bytes()
    assert restored == (SEEDS / "provisionerd.restored.proto").read_bytes()


VAGRANT_METHODS = [
    "GetVersionInfo", "UpsertBasis", "GetBasis", "FindBasis", "ListBasis",
    "UpsertProject", "GetProject", "FindProject", "ListProjects",
    "UpsertTarget", "DeleteTarget", "GetTarget", "FindTarget", "ListTargets",
    "UpsertBox", "DeleteBox", "GetBox", "ListBoxes", "FindBox",
    "GetLogStream", "QueueJob", "CancelJob", "GetJob", "_ListJobs", "ValidateJob",
    "GetJobStream", "PruneOldJobs", "GetRunner", "BootstrapToken", "GenerateInviteToken",
    "GenerateLoginToken", "ConvertInviteToken", "RunnerConfig", "RunnerJobStream",
]  # fmt: skip
PROVISIONERD_METHODS = [
    "AcquireJob", "AcquireJobWithCancel", "CommitQuota", "UpdateJob", "FailJob", "CompleteJob",
]  # fmt: skip


def test_service_and_method_names() -> None:
    vagrant = vs.DESCRIPTOR.services_by_name["Vagrant"]
    assert vagrant.full_name == "hashicorp.vagrant.Vagrant"
    assert [m.name for m in vagrant.methods] == VAGRANT_METHODS
    daemon = pd.DESCRIPTOR.services_by_name["ProvisionerDaemon"]
    assert daemon.full_name == "provisionerd.ProvisionerDaemon"
    assert [m.name for m in daemon.methods] == PROVISIONERD_METHODS
    streams = {m.name: (m.client_streaming, m.server_streaming) for m in vagrant.methods}
    assert streams["RunnerJobStream"] == (True, True)
    assert streams["GetJobStream"] == (False, True)
    acquire = daemon.methods_by_name["AcquireJobWithCancel"]
    assert (acquire.client_streaming, acquire.server_streaming) == (True, True)


# (message, field, number, type, label-is-repeated)
FIELDS = [
    (vs.Job, "id", 1, F.TYPE_STRING, False),
    (vs.Job, "target_runner", 5, F.TYPE_MESSAGE, False),
    (vs.Job, "labels", 6, F.TYPE_MESSAGE, True),
    (vs.Job, "command", 54, F.TYPE_MESSAGE, False),
    (vs.Job, "state", 100, F.TYPE_ENUM, False),
    (vs.Job, "expire_time", 109, F.TYPE_MESSAGE, False),
    (vs.Basis, "data_source", 101, F.TYPE_MESSAGE, False),
    (vs.Target, "record", 11, F.TYPE_MESSAGE, False),
    (vs.Target, "uuid", 8, F.TYPE_STRING, False),
    (vs.Box, "last_update", 8, F.TYPE_MESSAGE, False),
    (vs.Job.CommandResult, "exit_code", 4, F.TYPE_SINT32, False),
    (vs.GetJobStreamResponse.Terminal.Event, "step", 8, F.TYPE_MESSAGE, False),
    (vs.RunnerJobStreamRequest, "heartbeat", 6, F.TYPE_MESSAGE, False),
    (vs.TokenTransport, "metadata", 4, F.TYPE_MESSAGE, True),
    (vs.Snapshot.BoltChunk, "final", 3, F.TYPE_BOOL, False),
    (sdk.Ref.Project, "basis", 3, F.TYPE_MESSAGE, False),
    (sdk.Ref.Project, "name", 4, F.TYPE_STRING, False),
    (sdk.Ref.Box, "provider", 4, F.TYPE_STRING, False),
    (sdk.Args.HashEntry, "value", 2, F.TYPE_MESSAGE, False),
    (sdk.Command.CommandInfo, "primary", 6, F.TYPE_BOOL, False),
    (sdk.Command.Arguments.Flag, "bool", 3, F.TYPE_BOOL, False),
    (pd.AcquiredJob, "template_source_archive", 5, F.TYPE_BYTES, False),
    (pd.AcquiredJob, "trace_metadata", 9, F.TYPE_MESSAGE, True),
    (pd.AcquiredJob.WorkspaceBuild, "state", 8, F.TYPE_BYTES, False),
    (pd.FailedJob, "error_code", 6, F.TYPE_STRING, False),
    (pd.UpdateJobResponse, "variable_values", 3, F.TYPE_MESSAGE, True),
    (pd.CommitQuotaRequest, "daily_cost", 2, F.TYPE_INT32, False),
    (pd.Log, "created_at", 3, F.TYPE_INT64, False),
    (prov.Resource, "daily_cost", 8, F.TYPE_INT32, False),
    (prov.Metadata, "workspace_build_id", 17, F.TYPE_STRING, False),
    (prov.RichParameter, "validation_min", 10, F.TYPE_INT32, False),
    (prov.Agent, "instance_id", 10, F.TYPE_STRING, False),
]


@pytest.mark.parametrize(("message", "field", "number", "kind", "repeated"), FIELDS)
def test_field_numbers_and_types(
    message: type, field: str, number: int, kind: int, repeated: bool
) -> None:
    descriptor = message.DESCRIPTOR.fields_by_name[field]  # type: ignore[attr-defined]
    assert descriptor.number == number
    assert descriptor.type == kind
    assert descriptor.is_repeated == repeated


def test_full_names_used_in_any_type_urls() -> None:
    assert sdk.Args.Target.Machine.State.DESCRIPTOR.full_name == (
        "hashicorp.vagrant.sdk.Args.Target.Machine.State"
    )
    assert vs.Job.DESCRIPTOR.full_name == "hashicorp.vagrant.Job"
    assert pd.LogSource.Value("PROVISIONER") == 1
    assert prov.WorkspaceTransition.Value("DESTROY") == 2
    assert sdk.Command.Flag.Type.Value("BOOL") == 2
    assert sdk.Command.Arguments.Flag.Type.Value("BOOL") == 1
