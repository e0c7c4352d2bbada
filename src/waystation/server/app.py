"""The server process: one grpc.aio server carrying every service."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

import grpc
from grpc import aio
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer  # health.aio, spelled for mypy
from grpc_reflection.v1alpha import reflection, reflection_pb2_grpc
from grpc_reflection.v1alpha._async import ReflectionServicer as AsyncReflectionServicer

import waystation
from waystation.auth.service import Authenticator
from waystation.core.limits import MAX_MESSAGE_BYTES
from waystation.core.settings import ServerSettings, is_loopback
from waystation.core.timeouts import now_us
from waystation.engine.engine import JobEngine
from waystation.files import warn_if_loose
from waystation.metrics import RPCMetrics, serve_metrics
from waystation.protocol import vagrant_server_pb2_grpc as vs_grpc
from waystation.protocol.provisionerd.proto import provisionerd_pb2_grpc as pd_grpc
from waystation.protocol.waystation.v1 import admin_pb2_grpc as admin_grpc
from waystation.protocol.waystation.v1 import provisioning_pb2_grpc as pv_grpc
from waystation.protocol.waystation.v1 import users_pb2_grpc as users_grpc
from waystation.server import admin, provisionerd, provisioning, users, vagrant
from waystation.server.auth import Guard
from waystation.server.decoding import DecodeSafely
from waystation.store import Store
from waystation.store.connect import open_store

log = logging.getLogger(__name__)

SERVICES = (
    vagrant.SERVICE,
    provisionerd.SERVICE,
    admin.SERVICE,
    provisioning.SERVICE,
    users.SERVICE,
    users.AUDIT_SERVICE,
)

AUDIT_PRUNE_SECONDS = 3600.0


@dataclass
class RunningServer:
    server: aio.Server
    engine: JobEngine
    health: HealthServicer
    address: str
    metrics_address: str | None = None  # HOST:PORT of /metrics, when served
    stop_metrics: Callable[[], None] | None = None
    # Set to shut down: by SIGINT or SIGTERM, or by a restore with open.exit.
    exit_requested: asyncio.Event = field(default_factory=asyncio.Event)
    audit_pruner: asyncio.Task[None] | None = None

    @property
    def store(self) -> Store:
        return self.engine.store

    async def stop(self, grace: float) -> None:
        for name in ("", *SERVICES):
            await self.health.set(name, health_pb2.HealthCheckResponse.NOT_SERVING)
        self.engine.drain()  # no new assignments; idle runner streams end now
        await self.server.stop(grace)  # running jobs get the grace period to report
        if self.audit_pruner is not None:
            self.audit_pruner.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.audit_pruner
        await self.engine.stop()
        await self.store.close()  # drains the write queue: in-flight writes finish
        if self.stop_metrics is not None:
            await asyncio.to_thread(self.stop_metrics)


async def start(settings: ServerSettings) -> RunningServer:
    warn_if_loose(settings.data_dir)
    store = await open_store(settings.database_url, fsync=settings.fsync, wait=settings.db_wait)
    try:
        await asyncio.to_thread(store.snapshot_apply_staged, settings.data_dir)
    except Exception:
        await store.close()
        raise
    engine = JobEngine(store, settings.timeouts)
    authenticator = Authenticator(store, settings.token_ttl)
    exit_requested = asyncio.Event()
    metrics_address = stop_metrics = None
    if settings.metrics_listen:
        try:
            metrics_address, stop_metrics = serve_metrics(engine, settings.metrics_listen)
        except OSError:
            await store.close()
            raise
    guard = Guard(authenticator, enabled=settings.auth)
    # Outermost, so that calls the guard refuses are counted too.
    measure = [RPCMetrics(engine.metrics)] if settings.metrics_listen else []
    server = aio.server(
        interceptors=[*measure, guard],
        options=[
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ("grpc.so_reuseport", 0),
            # New calls waiting for the servicer: gRPC cancels any beyond 1,000 by
            # default, which a few thousand runners reconnecting at once exceed.
            ("grpc.server.max_pending_requests", 20_000),
            ("grpc.server.max_pending_requests_hard_limit", 40_000),
        ],
    )
    # Servicers are plain classes (see server.unimplemented): cast for the stubs' types.
    # Our services answer requests that do not parse with INVALID_ARGUMENT (server.decoding).
    safe = cast(aio.Server, DecodeSafely(server))
    vs_grpc.add_VagrantServicer_to_server(
        cast(vs_grpc.VagrantServicer, vagrant.VagrantService(engine, authenticator, settings.auth)),
        cast(aio.Server, AllowEncoded(safe)),
    )
    pd_grpc.add_ProvisionerDaemonServicer_to_server(
        cast(
            pd_grpc.ProvisionerDaemonServicer,
            provisionerd.ProvisionerDaemonService(engine, authenticator, settings.auth),
        ),
        safe,
    )
    pv_grpc.add_ProvisioningServicer_to_server(
        cast(pv_grpc.ProvisioningServicer, provisioning.ProvisioningService(engine)), safe
    )
    admin_grpc.add_AdminServicer_to_server(
        cast(
            admin_grpc.AdminServicer,
            admin.AdminService(engine, authenticator, settings.data_dir, exit_requested.set),
        ),
        safe,
    )
    users_grpc.add_UsersServicer_to_server(
        cast(users_grpc.UsersServicer, users.UsersService(store)), safe
    )
    users_grpc.add_AuditServicer_to_server(
        cast(users_grpc.AuditServicer, users.AuditService(store)), safe
    )
    health_servicer = HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, safe)
    # What reflection.enable_server_reflection does for an aio server, through `safe`.
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(
        AsyncReflectionServicer((*SERVICES, health.SERVICE_NAME, reflection.SERVICE_NAME)),
        safe,
    )
    try:
        if settings.tls_cert and settings.tls_key:
            credentials = grpc.ssl_server_credentials(
                [(settings.tls_key.read_bytes(), settings.tls_cert.read_bytes())]
            )
            port = server.add_secure_port(settings.listen, credentials)
        else:
            port = server.add_insecure_port(settings.listen)
    except (RuntimeError, OSError) as exc:
        await store.close()
        if stop_metrics is not None:
            stop_metrics()
        raise OSError(f"cannot listen on {settings.listen}: {exc}") from None
    host = settings.listen.rsplit(":", 1)[0]
    await server.start()
    await engine.start()
    for name in ("", *SERVICES):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    address = f"{host}:{port}"
    log.info("waystation %s listening on %s", waystation.__version__, address)
    if not settings.auth:
        log.warning(
            "DEV MODE: authentication is OFF; anyone who reaches %s can do anything", address
        )
    if not settings.tls_cert and not is_loopback(host):
        log.warning("listening beyond loopback without TLS: tokens cross the network in clear")
    pruner = asyncio.create_task(prune_audit(store, settings.audit_retention), name="audit-prune")
    return RunningServer(
        server,
        engine,
        health_servicer,
        address,
        metrics_address,
        stop_metrics,
        exit_requested,
        pruner,
    )


async def prune_audit(store: Store, retention: float, every: float = AUDIT_PRUNE_SECONDS) -> None:
    """Delete audit entries older than `retention` seconds, now and every `every`.
    Every replica does it; a delete of what another already deleted is harmless."""
    while True:
        try:
            pruned = await store.audit_prune(now_us() - int(retention * 1_000_000))
            if pruned:
                log.info("pruned %d audit log entries", pruned, extra={"audit_pruned": pruned})
        except Exception:  # a database away for a while: try again next time
            log.exception("pruning the audit log failed")
        await asyncio.sleep(every)


async def serve(settings: ServerSettings) -> None:
    """Run until SIGINT or SIGTERM, then shut down gracefully."""
    running = await start(settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, running.exit_requested.set)
    await running.exit_requested.wait()
    log.info("shutting down (grace %.0fs)", settings.shutdown_grace)
    await running.stop(settings.shutdown_grace)
    log.info("stopped")


class AllowEncoded:
    """Registers a service on `server` so that its handlers may also answer with
    a message already serialized (bytes): a job's output, sent to many watchers,
    is encoded once (engine.output) instead of once per watcher."""

    def __init__(self, server: aio.Server) -> None:
        self.server = server

    def add_generic_rpc_handlers(
        self, handlers: Iterable[grpc.GenericRpcHandler[Any, Any]]
    ) -> None:
        self.server.add_generic_rpc_handlers(tuple(_GenericAllowEncoded(h) for h in handlers))

    def add_registered_method_handlers(
        self, service: str, handlers: Mapping[str, grpc.RpcMethodHandler[Any, Any]]
    ) -> None:
        allowed = {method: _allow_encoded(h) for method, h in handlers.items()}
        self.server.add_registered_method_handlers(service, allowed)  # type: ignore[attr-defined]


class _GenericAllowEncoded(grpc.GenericRpcHandler):  # type: ignore[type-arg]
    def __init__(self, inner: grpc.GenericRpcHandler[Any, Any]) -> None:
        self.inner = inner

    def service(self, details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler[Any, Any] | None:
        handler = self.inner.service(details)
        return _allow_encoded(handler) if handler is not None else None


def _allow_encoded(handler: Any) -> Any:
    serialize = handler.response_serializer
    if serialize is None:
        return handler

    def serializer(message: Any, serialize: Callable[[Any], bytes] = serialize) -> bytes:
        return message if type(message) is bytes else serialize(message)

    return handler._replace(response_serializer=serializer)
