"""Prometheus metrics (`--metrics-listen`): scraped over real HTTP while real
clients, runners and daemons use the server over gRPC. Both backends."""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

import grpc
import pytest
from grpc import aio
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.parser import text_string_to_metric_families

import waystation
from waystation import testing as t
from waystation.core.settings import ServerSettings
from waystation.protocol import vagrant_server_pb2 as vs
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.provisionerd.proto import provisionerd_pb2 as pd
from waystation.protocol.provisionerd.proto import provisionerd_pb2_grpc as pd_grpc
from waystation.protocol.waystation.v1 import provisioning_pb2_grpc as pv_grpc
from waystation.server.app import RunningServer, start

if TYPE_CHECKING:
    from waystation.protocol.vagrant_server_pb2_grpc import VagrantAsyncStub as Stub

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]
VAGRANT = "hashicorp.vagrant.Vagrant"


@pytest.fixture
def settings(settings: ServerSettings) -> ServerSettings:
    return replace(settings, metrics_listen="127.0.0.1:0")


async def scrape(server: RunningServer) -> Samples:
    """Every sample of /metrics, by name and labels."""
    url = f"http://{server.metrics_address}/metrics"

    def get() -> str:
        with urllib.request.urlopen(url, timeout=30) as response:
            assert response.headers.get_content_type() == "text/plain"
            return str(response.read().decode())

    text = await asyncio.to_thread(get)
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def handled(samples: Samples, method: str, code: str, kind: str = "unary") -> float:
    return value(
        samples,
        "grpc_server_handled_total",
        grpc_type=kind,
        grpc_service=VAGRANT,
        grpc_method=method,
        grpc_code=code,
    )


@pytest.fixture
async def fake_runner(channel: aio.Channel) -> AsyncIterator[t.FakeRunner]:
    fake = t.FakeRunner(channel, "metered")
    await fake.register()
    yield fake
    await fake.close()


async def test_a_job_run_end_to_end_shows_in_the_metrics(
    server: RunningServer, vagrant: Stub, fake_runner: t.FakeRunner
) -> None:
    before = await scrape(server)
    assert value(before, "waystation_runners_connected") == 1
    assert value(before, "waystation_job_assign_wait_seconds_count", kind="vagrant") == 0

    stream = fake_runner.job_stream()
    await stream.request()
    queued = await vagrant.QueueJob(vs.QueueJobRequest(job=t.noop_job()))
    job = await stream.assignment()
    assert job.id == queued.job_id
    await stream.send(ack=stream.Req.Ack())
    await stream.complete()
    await t.wait_for_state(vagrant, job.id, vs.Job.SUCCESS)
    assert await stream.read() is aio.EOF  # type: ignore[attr-defined]

    after = await scrape(server)
    assert handled(after, "QueueJob", "OK") == handled(before, "QueueJob", "OK") + 1
    assert handled(after, "RunnerJobStream", "OK", "bidi_stream") == 1
    assert value(after, "waystation_job_assign_wait_seconds_count", kind="vagrant") == 1
    assert value(after, "waystation_jobs", kind="vagrant", state="SUCCESS") == 1
    assert value(after, "waystation_jobs", kind="vagrant", state="QUEUED") == 0
    # A stream is timed for its whole life.
    duration = value(
        after,
        "grpc_server_handling_seconds_count",
        grpc_type="bidi_stream",
        grpc_service=VAGRANT,
        grpc_method="RunnerJobStream",
    )
    assert duration == 1
    # A server-streaming call (an async generator on our side) is counted at its end.
    assert (await t.watch(vagrant, job.id))[-1].WhichOneof("event") == "complete"
    watched = await scrape(server)
    assert handled(watched, "GetJobStream", "OK", "server_stream") == 1


async def test_failed_calls_are_counted_with_their_status_code(
    server: RunningServer, vagrant: Stub
) -> None:
    await t.expect_status(
        vagrant.GetJob(vs.GetJobRequest(job_id="01NOSUCHJOB")), grpc.StatusCode.NOT_FOUND
    )
    await t.expect_status(
        vagrant.QueueJob(vs.QueueJobRequest(job=vs.Job())), grpc.StatusCode.FAILED_PRECONDITION
    )
    async with aio.insecure_channel(server.address) as anonymous:  # no token: the guard refuses
        await t.expect_status(
            vs_grpc.VagrantStub(anonymous).GetJob(vs.GetJobRequest(job_id="x")),
            grpc.StatusCode.UNAUTHENTICATED,
        )
    samples = await scrape(server)
    assert handled(samples, "GetJob", "NOT_FOUND") == 1
    assert handled(samples, "GetJob", "UNAUTHENTICATED") == 1
    assert handled(samples, "QueueJob", "FAILED_PRECONDITION") == 1
    assert handled(samples, "QueueJob", "OK") == 0
    started = value(
        samples, "grpc_server_started_total", grpc_type="unary", grpc_service=VAGRANT,
        grpc_method="GetJob",
    )  # fmt: skip
    assert started == 2


async def test_queued_jobs_and_waiting_streams_are_gauged(
    server: RunningServer, vagrant: Stub, fake_runner: t.FakeRunner
) -> None:
    for _ in range(3):
        await vagrant.QueueJob(vs.QueueJobRequest(job=t.noop_job(runner_id="elsewhere")))
    stream = fake_runner.job_stream()
    await stream.request()  # nothing fits it: it waits
    for _ in range(600):
        samples = await scrape(server)
        if value(samples, "waystation_runners_waiting") == 1:
            break
        await asyncio.sleep(0.05)
    assert value(samples, "waystation_runners_waiting") == 1
    assert value(samples, "waystation_jobs", kind="vagrant", state="QUEUED") == 3
    stream.cancel()


async def test_a_provisioner_acquisition_is_timed(
    server: RunningServer, channel: aio.Channel
) -> None:
    pushed = await pv_grpc.ProvisioningStub(channel).PushTemplate(t.push_request())
    acquired = await pd_grpc.ProvisionerDaemonStub(channel).AcquireJob(
        pd.Empty(), metadata=t.daemon_metadata()
    )
    assert acquired.job_id == pushed.version.job_id
    samples = await scrape(server)
    assert value(samples, "waystation_job_assign_wait_seconds_count", kind="provisioner") == 1
    assert value(samples, "waystation_jobs", kind="provisioner", state="RUNNING") == 1
    service = "provisionerd.ProvisionerDaemon"
    assert (
        value(
            samples,
            "grpc_server_handled_total",
            grpc_type="unary",
            grpc_service=service,
            grpc_method="AcquireJob",
            grpc_code="OK",
        )
        == 1
    )


async def test_metrics_are_not_served_unless_asked(tmp_path: Path, backend_url: str) -> None:
    plain = ServerSettings(listen="127.0.0.1:0", data_dir=tmp_path / "d", db_url=backend_url)
    running = await start(plain)
    try:
        assert running.metrics_address is None
    finally:
        await running.stop(1)


async def test_an_unusable_metrics_address_fails_the_start(
    server: RunningServer, settings: ServerSettings
) -> None:
    taken = replace(settings, metrics_listen=server.metrics_address)
    with pytest.raises(OSError, match="cannot serve metrics on"):
        await start(taken)
    with pytest.raises(OSError, match="want HOST:PORT"):
        await start(replace(settings, metrics_listen="no-port"))
    # The running server still serves its own.
    assert value(await scrape(server), "waystation_runners_connected") == 0


async def test_process_platform_and_build_series_and_no_created_series(
    server: RunningServer,
) -> None:
    samples = await scrape(server)
    names = {name for name, _ in samples}
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= names
    assert {"python_info", "python_gc_collections_total"} <= names
    assert value(samples, "waystation_build_info", version=waystation.__version__) == 1
    assert not [name for name in names if name.endswith("_created")]
    # Filtered in our registry only: prometheus_client's global switch is untouched.
    other = CollectorRegistry()
    Counter("elsewhere", "A counter of another registry.", registry=other).inc()
    assert other.get_sample_value("elsewhere_created") is not None
