"""`waystation server run` as a real process: start, serve, stop, crash, restart."""

from __future__ import annotations

import re
import signal
import urllib.request
from pathlib import Path

import grpc
from google.protobuf.empty_pb2 import Empty
from grpc_health.v1 import health_pb2, health_pb2_grpc

from waystation import testing as t
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc

SERVICES = ["hashicorp.vagrant.Vagrant", "provisionerd.ProvisionerDaemon", "waystation.v1.Admin"]


def test_server_serves_health_version_and_stops_cleanly_on_sigterm(
    backend_url: str, tmp_path: Path
) -> None:
    server = t.ServerProcess(tmp_path / "data", backend_url)
    address = server.start()
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in ["", *SERVICES]:
            resp = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10)
            assert resp.status == health_pb2.HealthCheckResponse.SERVING
        info = vs_grpc.VagrantStub(channel).GetVersionInfo(Empty(), timeout=10).info
        assert info.api.current == 1 and info.api.minimum == 1
        assert info.entrypoint.current == 1
        assert info.version
    assert server.stop(signal.SIGTERM) == 0
    assert "stopped" in server.output()


def test_default_database_is_sqlite_in_the_data_dir(tmp_path: Path) -> None:
    server = t.ServerProcess(tmp_path / "data")
    server.start()
    assert server.stop(signal.SIGINT) == 0
    assert (tmp_path / "data" / "waystation.db").exists()


def test_startup_log_says_what_happened_without_library_chatter(tmp_path: Path) -> None:
    server = t.ServerProcess(tmp_path / "data")
    server.start()
    assert server.stop(signal.SIGTERM) == 0
    log = server.output()
    assert "Running upgrade" in log and "listening on" in log
    assert "setup plugin" not in log  # alembic's per-plugin INFO lines on every start


def test_acknowledged_writes_survive_kill_9(backend_url: str, tmp_path: Path) -> None:
    server = t.ServerProcess(tmp_path / "data", backend_url)
    address = server.start()
    with grpc.insecure_channel(address) as channel:
        stub = vs_grpc.VagrantStub(channel)
        made = [
            stub.UpsertBasis(vs.UpsertBasisRequest(basis=t.basis()), timeout=10).basis
            for _ in range(20)
        ]
    server.kill()
    address = server.start()
    with grpc.insecure_channel(address) as channel:
        refs = vs_grpc.VagrantStub(channel).ListBasis(Empty(), timeout=10).basis
    assert {r.resource_id for r in refs} == {m.resource_id for m in made}
    assert server.stop() == 0


def test_listen_failure_is_one_clear_error(tmp_path: Path) -> None:
    first = t.ServerProcess(tmp_path / "one")
    address = first.start()
    second = t.ServerProcess(tmp_path / "two", "", "--listen", address)
    try:
        second.start(timeout=30)
    except RuntimeError as exc:
        assert "cannot listen on" in str(exc)
        assert "Traceback" not in str(exc)
    else:
        raise AssertionError("a second server bound the same address")
    finally:
        first.stop()


def test_reflection_lists_every_service(tmp_path: Path) -> None:
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    server = t.ServerProcess(tmp_path / "data")
    address = server.start()
    try:
        with grpc.insecure_channel(address) as channel:
            stub = reflection_pb2_grpc.ServerReflectionStub(channel)
            request = reflection_pb2.ServerReflectionRequest(list_services="")
            (response,) = list(stub.ServerReflectionInfo(iter([request]), timeout=10))
            names = {s.name for s in response.list_services_response.service}
            assert set(SERVICES) <= names
            assert "grpc.health.v1.Health" in names
            # And the files describing them, so that grpcurl can build requests.
            file_request = reflection_pb2.ServerReflectionRequest(
                file_containing_symbol="hashicorp.vagrant.Vagrant"
            )
            (described,) = list(stub.ServerReflectionInfo(iter([file_request]), timeout=10))
            assert described.file_descriptor_response.file_descriptor_proto
    finally:
        server.stop()


def test_metrics_are_served_over_http_when_asked(tmp_path: Path) -> None:
    server = t.ServerProcess(tmp_path / "data", "", "--metrics-listen", "127.0.0.1:0")
    address = server.start()
    with grpc.insecure_channel(address) as channel:
        vs_grpc.VagrantStub(channel).GetVersionInfo(Empty(), timeout=10)
    found = re.search(r"metrics on http://(\S+)/metrics", server.output())
    assert found, server.output()
    with urllib.request.urlopen(f"http://{found.group(1)}/metrics", timeout=30) as response:
        text = response.read().decode()
    assert 'grpc_method="GetVersionInfo"' in text
    assert "# TYPE waystation_jobs gauge" in text
    assert server.stop(signal.SIGTERM) == 0
