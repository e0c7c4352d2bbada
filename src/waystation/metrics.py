"""Prometheus metrics: what the server does (its RPCs, how long jobs wait for a
runner or daemon) and what it holds (jobs by state, runners and daemons).

Each engine has its own registry, so servers sharing a process (tests) do not
add into each other's figures. `waystation server run --metrics-listen ADDR`
serves it over HTTP; without that flag nothing is served and the RPCs are not
intercepted. The RPC metrics use go-grpc-prometheus' names and labels, so the
dashboards written for Go gRPC servers read them as they are.

Job counts come from the database at scrape time, so every replica sharing a
PostgreSQL reports the same figures; runner and daemon gauges are this
replica's own streams.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpc
from grpc import aio
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, RestrictedRegistry

import waystation

if TYPE_CHECKING:
    from waystation.engine.engine import JobEngine

log = logging.getLogger(__name__)

# Queue to assignment: milliseconds when runners wait, minutes when none is free.
WAIT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300)
SCRAPE_TIMEOUT = 10.0  # seconds a scrape waits for the database


class Registry(CollectorRegistry):
    """A registry without the `_created` series of counters and histograms: a
    timestamp series per labelled series that dashboards do not read. Filtered
    here, per registry, because prometheus_client's own switch
    (disable_created_metrics) is one global for every registry in the process."""

    def __init__(self) -> None:
        # The process, platform and GC collectors describe nothing up front:
        # this way scrapes restricted by name (?name[]=...) still reach them.
        super().__init__(support_collectors_without_names=True)

    def collect(self) -> Iterable[Metric]:
        for family in super().collect():
            yield _without_created(family)

    def restricted_registry(self, names: Iterable[str]) -> RestrictedRegistry:
        return super().restricted_registry(n for n in names if not n.endswith("_created"))


def _without_created(family: Metric) -> Metric:
    created = family.name + "_created"
    if not any(sample.name == created for sample in family.samples):
        return family
    kept = Metric(family.name, family.documentation, family.type, family.unit)
    kept.samples = [sample for sample in family.samples if sample.name != created]
    return kept


@dataclass
class Metrics:
    registry: CollectorRegistry = field(default_factory=Registry)

    def __post_init__(self) -> None:
        # What every Prometheus client serves by default: the process (CPU,
        # memory, open files), the Python version and its garbage collector.
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        GCCollector(registry=self.registry)
        Gauge(
            "waystation_build_info",
            "Always 1, labelled with the waystation version serving.",
            ("version",),
            registry=self.registry,
        ).labels(waystation.__version__).set(1)
        rpc = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter(
            "grpc_server_started", "RPCs started on the server.", rpc, registry=self.registry
        )
        self.handled = Counter(
            "grpc_server_handled",
            "RPCs completed on the server, whatever their status.",
            (*rpc, "grpc_code"),
            registry=self.registry,
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds",
            "Time from an RPC's start to its end on the server (a stream: its whole life).",
            rpc,
            registry=self.registry,
        )
        self.assign_wait = Histogram(
            "waystation_job_assign_wait_seconds",
            "Time from a job's queueing to its assignment to a runner (vagrant)"
            " or its acquisition by a provisioner daemon (provisioner).",
            ("kind",),
            buckets=WAIT_BUCKETS,
            registry=self.registry,
        )


class EngineCollector(Collector):
    """What the engine holds, read at scrape time (on the HTTP server's thread:
    the database read runs on the engine's loop)."""

    def __init__(self, engine: JobEngine, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.loop = loop

    def describe(self) -> list[Any]:
        # Named up front, so that registering does not run a scrape.
        return list(self._families())

    def collect(self) -> Iterator[Any]:
        jobs, runners, connected, daemons = self._families()
        try:
            read = self.engine.store.jobs_count_by_state()
            counts = asyncio.run_coroutine_threadsafe(read, self.loop).result(SCRAPE_TIMEOUT)
        except Exception as exc:  # an outage or shutdown: the scrape still answers
            log.warning("metrics: could not count jobs: %s", exc)
            counts = []
        for kind, state, count in counts:
            jobs.add_metric([kind, state], count)
        waiting, parked, streams = self.engine.occupancy()
        runners.add_metric([], waiting)
        connected.add_metric([], streams)
        daemons.add_metric([], parked)
        yield from (jobs, runners, connected, daemons)

    @staticmethod
    def _families() -> tuple[GaugeMetricFamily, ...]:
        return (
            GaugeMetricFamily(
                "waystation_jobs",
                "Jobs in the store, by kind (vagrant, provisioner) and state.",
                labels=("kind", "state"),
            ),
            GaugeMetricFamily(
                "waystation_runners_waiting", "Runner job streams on this server waiting for a job."
            ),
            GaugeMetricFamily(
                "waystation_runners_connected",
                "Runners with a config stream open on this server.",
            ),
            GaugeMetricFamily(
                "waystation_provisioner_daemons_waiting",
                "Provisioner daemons on this server waiting to acquire a job.",
            ),
        )


if TYPE_CHECKING:
    _Interceptor = aio.ServerInterceptor[Any, Any]
else:  # generic only to type checkers
    _Interceptor = aio.ServerInterceptor

# (request streaming, response streaming) -> the grpc_type label, the handler's field
_KINDS = {
    (False, False): ("unary", "unary_unary"),
    (False, True): ("server_stream", "unary_stream"),
    (True, False): ("client_stream", "stream_unary"),
    (True, True): ("bidi_stream", "stream_stream"),
}


class RPCMetrics(_Interceptor):
    """Counts and times every RPC by service, method and final status code."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    async def intercept_service(
        self,
        continuation: Callable[
            [grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler[Any, Any]]
        ],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler[Any, Any]:
        handler = await continuation(details)
        if handler is None:
            return handler
        service, _, method = details.method.lstrip("/").rpartition("/")
        kind, field_name = _KINDS[handler.request_streaming, handler.response_streaming]
        labels = (kind, service, method)
        behavior = getattr(handler, field_name)
        if inspect.isasyncgenfunction(behavior):
            wrapped: Any = self._generator(behavior, labels)
        else:
            wrapped = self._coroutine(behavior, labels)
        return handler._replace(**{field_name: wrapped})  # type: ignore[attr-defined, no-any-return]

    def _coroutine(self, behavior: Any, labels: tuple[str, str, str]) -> Any:
        async def measured(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            started = self._start(labels)
            try:
                result = await behavior(request, context)
            except BaseException as exc:
                self._end(labels, started, context, exc)
                raise
            self._end(labels, started, context, None)
            return result

        return measured

    def _generator(self, behavior: Any, labels: tuple[str, str, str]) -> Any:
        async def measured(request: Any, context: aio.ServicerContext[Any, Any]) -> Any:
            started = self._start(labels)
            try:
                async for item in behavior(request, context):
                    yield item
            except BaseException as exc:
                self._end(labels, started, context, exc)
                raise
            self._end(labels, started, context, None)

        return measured

    def _start(self, labels: tuple[str, str, str]) -> float:
        self.metrics.started.labels(*labels).inc()
        return time.perf_counter()

    def _end(
        self,
        labels: tuple[str, str, str],
        started: float,
        context: aio.ServicerContext[Any, Any],
        exc: BaseException | None,
    ) -> None:
        self.metrics.handling.labels(*labels).observe(time.perf_counter() - started)
        self.metrics.handled.labels(*labels, _code(context, exc)).inc()


def _code(context: aio.ServicerContext[Any, Any], exc: BaseException | None) -> str:
    if isinstance(exc, asyncio.CancelledError):
        return grpc.StatusCode.CANCELLED.name
    code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code.name
    if isinstance(code, int):  # grpc.aio keeps what abort() was given, as given
        for member in grpc.StatusCode:
            if member.value[0] == code:
                return member.name
    # No code set: OK, unless the handler failed on its own (gRPC answers UNKNOWN).
    return grpc.StatusCode.OK.name if exc is None else grpc.StatusCode.UNKNOWN.name


def serve_metrics(engine: JobEngine, listen: str) -> tuple[str, Callable[[], None]]:
    """Serve the engine's metrics at http://LISTEN/metrics: the address it
    listens on (port 0 picks one) and how to stop."""
    host, _, port = listen.rpartition(":")
    if not port.isdigit():
        raise OSError(f"cannot serve metrics on {listen!r}: want HOST:PORT")
    registry = engine.metrics.registry
    registry.register(EngineCollector(engine, asyncio.get_running_loop()))
    try:
        server, thread = start_http_server(int(port), addr=host.strip("[]"), registry=registry)
    except OSError as exc:
        raise OSError(f"cannot serve metrics on {listen}: {exc}") from None
    bound_port = server.server_address[1]
    address = f"{host}:{bound_port}"
    log.info("metrics on http://%s/metrics", address)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return address, stop
